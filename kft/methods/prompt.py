"""Prompt tuning (Lester et al., 2021): learned vectors prepended to the input; the backbone is frozen.

`--num_prompt_tokens` vectors are inserted right after the first position (the start token, which a
pooled output reads; for a decoder, the first token of the prompt) of the first transformer block's
input, so every layer attends to them; the
padding mask grows by as many ones, and the prompt positions are removed again from the sequence
output, so the task head sees the usual [batch, length, hidden]. Real tokens keep their own position
embeddings. The vectors start as the embedded forms of real vocabulary words (random whole words,
seeded), the initialisation the paper found best. The backbone graph is rebuilt around its own
layers (`keras.models.clone_model` with shared layers); only the prompt and the head train.
"""

from __future__ import annotations

import keras
import numpy as np

from kft.models import backbones
from kft.config import FlagError


class PromptTokens(keras.layers.Layer):
    """Inserts the prompt vectors after position 0 and extends the padding mask to match."""

    def __init__(self, num_tokens: int, hidden: int, **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = num_tokens
        self.prompts = self.add_weight(name="prompts", shape=(num_tokens, hidden), initializer="zeros")

    def call(self, x, padding_mask):
        batch = keras.ops.shape(x)[0]
        prompts = keras.ops.broadcast_to(keras.ops.cast(self.prompts, x.dtype)[None],
                                         (batch, self.num_tokens, x.shape[-1]))
        x = keras.ops.concatenate([x[:, :1], prompts, x[:, 1:]], axis=1)
        ones = keras.ops.ones((batch, self.num_tokens), dtype=padding_mask.dtype)
        padding_mask = keras.ops.concatenate([padding_mask[:, :1], ones, padding_mask[:, 1:]], axis=1)
        return x, padding_mask


class PromptStrip(keras.layers.Layer):
    """Drops the prompt positions from a sequence output."""

    def __init__(self, num_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.num_tokens = num_tokens

    def call(self, x):
        return keras.ops.concatenate([x[:, :1], x[:, 1 + self.num_tokens:]], axis=1)


def word_ids(vocabulary: list[str] | None, size: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct ids of whole alphabetic words (no special tokens, no ## pieces), seeded."""
    candidates = [i for i, w in enumerate(vocabulary or []) if w.isalpha()] or list(range(size))
    rng = np.random.default_rng(seed)
    return rng.choice(candidates, size=count, replace=count > len(candidates))


def apply(backbone, config, vocabulary=None):
    n = config.num_prompt_tokens
    if n < 1:
        raise FlagError(f"--num_prompt_tokens={n}: must be at least 1")
    blocks = backbones.transformer_layers(backbone)
    first, last = blocks[0], blocks[-1]
    for variable in backbone.weights:
        variable.trainable = False
    state = {}

    def call_function(layer, *args, **kwargs):
        # Encoder blocks take `padding_mask`, keras-hub's decoder blocks `decoder_padding_mask`.
        key = "decoder_padding_mask" if "decoder_padding_mask" in kwargs else "padding_mask"
        if layer is first:
            state["block_input"] = args[0]
            state["tokens"] = PromptTokens(n, int(args[0].shape[-1]), name="prompt_tokens")
            x, state["mask"] = state["tokens"](args[0], kwargs[key])
            args = (x, *args[1:])
        if any(layer is block for block in blocks):
            kwargs[key] = state["mask"]
        out = layer(*args, **kwargs)
        return PromptStrip(n, name="prompt_strip")(out) if layer is last else out

    rebuilt = keras.models.clone_model(backbone, clone_function=lambda layer: layer,
                                       call_function=call_function)
    # Initial prompts: what the first block would see for real words at positions 1..n.
    ids = word_ids(vocabulary, int(backbone.token_embedding.input_dim), n + 1, config.seed)[None]
    embed = keras.Model(rebuilt.input, state["block_input"])
    feed = {name: (ids.astype("int32") if name == "token_ids" else
                   np.ones_like(ids, "int32") if name == "padding_mask" else np.zeros_like(ids, "int32"))
            for name in rebuilt.input}
    state["tokens"].prompts.assign(keras.ops.convert_to_numpy(embed(feed, training=False))[0, 1:])
    return rebuilt, {"method": "prompt", "num_prompt_tokens": n}


def prompt_layer(model):
    """The model's PromptTokens layer (searched through nested models), or None."""
    for layer in model.layers:
        if isinstance(layer, PromptTokens):
            return layer
        if isinstance(layer, keras.Model):
            found = prompt_layer(layer)
            if found is not None:
                return found
    return None
