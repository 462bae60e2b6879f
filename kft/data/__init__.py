"""Reading labelled data, encoding it for encoders, caching token ids, and augmentation."""
