"""kft: fine-tune pretrained language-model backbones with Keras 3 and TensorFlow."""

__version__ = "0.1.0"

import os as _os

# Files that ship with kft (the sample reviews, the general-text sample, the synonym table).
SAMPLE_DATA = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "sample_data")
