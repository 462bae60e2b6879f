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
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kft.models import backbones
from kft.config import FlagError

# Keywords of a decoder block's cached call (generation): never recomputed, no gradient there.
_CACHE_KEYWORDS = ("self_attention_cache", "cache", "self_attention_cache_update_index", "cache_update_index")


def _active_dropout(block: keras.layers.Layer) -> list[float]:
    return [layer.rate for layer in block._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.Dropout) and layer.rate > 0]


def enable(backbone: keras.Model) -> int:
    """Recompute each transformer block of `backbone` in the backward pass of training calls;
    returns the number of blocks. Inference calls (training falsy) and cached calls run as before.

    Blocks with dropout are refused: the recomputed pass would draw new dropout masks, and the
    gradient would belong to a different forward pass than the loss.
    """
    blocks = backbones.transformer_layers(backbone)
    if not blocks:
        raise FlagError(f"--gradient_checkpointing: {type(backbone).__name__} has no transformer blocks to "
                        "recompute")
    for block in blocks:
        rates = _active_dropout(block)
        if rates:
            raise FlagError(f"--gradient_checkpointing: {type(backbone).__name__}'s blocks use dropout (rate "
                            f"{max(rates):g}), which a recomputed pass would draw anew, so the gradient would "
                            "not match the loss; it supports dropout-free blocks (llama-family decoders)")
    for block in blocks:
        if getattr(block, "_kft_recomputed", False):
            continue
        original = block.call

        def call(inputs, *args, _original=original, **kwargs):
            if args or not kwargs.get("training") or any(kwargs.get(k) is not None for k in _CACHE_KEYWORDS):
                return _original(inputs, *args, **kwargs)
            # Float tensors (an encoder-decoder's encoder output) need their gradient: positional
            # arguments of the recomputed function. Masks and flags stay in the closure.
            names = [k for k, v in kwargs.items() if tf.is_tensor(v) and v.dtype.is_floating]
            fixed = {k: v for k, v in kwargs.items() if k not in names}

            @tf.recompute_grad
            def recomputed(x, *values):
                return _original(x, **fixed, **dict(zip(names, values)))

            return recomputed(inputs, *[kwargs[k] for k in names])

        # An instance attribute: Layer.__call__ calls it (as kft.analysis.attributions does for embeddings).
        block.call = call
        block._kft_recomputed = True
    return len(blocks)
