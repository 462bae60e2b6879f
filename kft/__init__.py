"""kft: fine-tune pretrained language-model backbones with Keras 3 and TensorFlow."""

__version__ = "0.1.0"
