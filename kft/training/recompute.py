"""Gradient checkpointing (--gradient_checkpointing): each transformer block keeps only its input for
the backward pass and recomputes its activations there.

The backward pass of a plain step holds every block's activations at once (for a decoder, the
attention scores [batch x heads x length x length] of each block); with this, one block's at a
time, for one more forward pass of compute.

Written here rather than with Keras' RematScope / keras.remat: with the TensorFlow backend those wrap
a layer's call in tf.recompute_grad, whose custom gradient rejects keyword arguments inside a
tf.function ("supports keywords arguments only when eager execution is enabled", TF 2.21), and
keras-hub calls its blocks with keyword masks. Here the keywords are bound in a closure and only
the block's input goes through the recomputed function.

Dropout: a Keras Dropout layer draws its seed from its SeedGenerator each call, so a recomputed pass
would draw new masks and the gradient would belong to another forward pass than the loss. Here each
block's dropout seeds are drawn once, outside the recomputed function (from the same generators, in
the same order a plain step draws them), and the recomputed pass reuses them: the masks, the loss
and the gradients are those of the step without checkpointing.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kft.models import backbones
from kft.config import FlagError

# Keywords of a decoder block's cached call (generation): never recomputed, no gradient there.
_CACHE_KEYWORDS = ("self_attention_cache", "cache", "self_attention_cache_update_index", "cache_update_index")


def _dropouts(block: keras.layers.Layer) -> list[keras.layers.Dropout]:
    return [layer for layer in block._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.Dropout) and layer.rate > 0]


def _seeded_dropout(layer: keras.layers.Dropout) -> None:
    """Makes `layer` use a seed set on it (`_kft_seed`) instead of drawing one, while one is set."""
    original = layer.call

    def call(inputs, training=False, _layer=layer, _original=original):
        seed = getattr(_layer, "_kft_seed", None)
        if seed is None or not training:
            return _original(inputs, training=training)
        noise_shape = None if _layer.noise_shape is None else [
            tf.shape(inputs)[i] if d is None else d for i, d in enumerate(_layer.noise_shape)]
        # what keras' TensorFlow dropout computes, with the seed drawn before the recomputed call
        return tf.nn.experimental.stateless_dropout(inputs, rate=_layer.rate, noise_shape=noise_shape, seed=seed)

    layer.call = call


def _draw_seeds(dropouts: list[keras.layers.Dropout]) -> list:
    """One seed per dropout layer from its own generator, as its plain call would draw it."""
    from keras.src.backend.tensorflow.random import _cast_seed  # the int32 form stateless ops take
    from keras.src.random.seed_generator import draw_seed

    return [_cast_seed(draw_seed(layer.seed_generator)) for layer in dropouts]


def _recomputed_call(original, dropouts: list[keras.layers.Dropout]):
    """A block call that keeps only its inputs for the backward pass on training calls."""

    def call(inputs, *args, **kwargs):
        if args or not kwargs.get("training") or any(kwargs.get(k) is not None for k in _CACHE_KEYWORDS):
            return original(inputs, *args, **kwargs)
        # Float tensors (an encoder-decoder's encoder output) need their gradient: positional
        # arguments of the recomputed function. Masks and flags stay in the closure.
        names = [k for k, v in kwargs.items() if tf.is_tensor(v) and v.dtype.is_floating]
        fixed = {k: v for k, v in kwargs.items() if k not in names}
        seeds = _draw_seeds(dropouts)

        @tf.recompute_grad
        def recomputed(x, *values):
            for layer, seed in zip(dropouts, seeds):
                layer._kft_seed = seed
            try:
                return original(x, **fixed, **dict(zip(names, values)))
            finally:
                for layer in dropouts:
                    layer._kft_seed = None

        return recomputed(inputs, *[kwargs[k] for k in names])

    return call


def enable(backbone: keras.Model) -> int:
    """Recompute each transformer block of `backbone` in the backward pass of training calls;
    returns the number of blocks. Inference calls (training falsy) and cached calls run as before;
    dropout inside a block draws the same masks in the forward and the recomputed pass.
    """
    blocks = backbones.transformer_layers(backbone)
    if not blocks:
        raise FlagError(f"--gradient_checkpointing: {type(backbone).__name__} has no transformer blocks to "
                        "recompute")
    for block in blocks:
        if getattr(block, "_kft_recomputed", False):
            continue
        dropouts = _dropouts(block)
        for layer in dropouts:
            _seeded_dropout(layer)
        # An instance attribute: Layer.__call__ calls it (as kft.analysis.attributions does for embeddings).
        block.call = _recomputed_call(block.call, dropouts)
        block._kft_recomputed = True
    return len(blocks)
