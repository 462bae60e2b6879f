"""Reading labelled data, encoding it for encoders, caching token ids, and augmentation."""

# The label of a position that no loss or metric reads (here so that processes without TensorFlow,
# such as the Hugging Face rows of the benchmarks, can share it).
IGNORE = -1
