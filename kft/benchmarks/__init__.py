"""kft measured against keras-hub's recipe and the Hugging Face Trainer, row by row."""
