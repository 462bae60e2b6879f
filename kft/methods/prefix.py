"""Prefix tuning (Li & Liang, 2021), deep as in P-tuning v2: learned keys and values at every layer.

Every transformer block's self-attention sees `--prefix_length` extra positions, whose key and value
vectors (per head) are learned; queries of real tokens attend to them, and they never appear in the
output sequence. With `--prefix_projection=H` the vectors are produced during training by a small
MLP (embedding [length, hidden] -> tanh(H) -> keys and values of all layers), the reparameterisation
the paper uses for stability, added to the frozen initial vectors; `fold` computes them once and
drops the MLP, so the exported graph holds plain vectors. Initial vectors are each layer's own key
and value projections of its input when the backbone reads real vocabulary words (in-distribution
keys and values, so the prefix does not swamp the attention at the start). The backbone is frozen;
only the prefix (or its MLP) and the head train.
"""

from __future__ import annotations

import keras
import numpy as np

from kft.models import backbones
from kft.config import FlagError
from kft.methods.prompt import word_ids


class PrefixEncoder(keras.layers.Layer):
    """The reparameterisation: [length, hidden] embedding -> MLP -> [length, layers, 2, heads, dim]."""

    def __init__(self, init: np.ndarray, layers: int, heads: int, dim: int, projection: int, **kwargs):
        super().__init__(**kwargs)
        self.shape_out = (init.shape[0], layers, 2, heads, dim)
        self.embedding = self.add_weight(name="embedding", shape=init.shape,
                                         initializer=keras.initializers.Constant(init))
        self.hidden = keras.layers.Dense(projection, activation="tanh", name="hidden")
        # Zero output layer: training starts exactly at the initial vectors, which stay frozen and
        # which the MLP's output is added to (a random MLP output would start from noise keys and
        # values in every layer, far from anything the backbone has seen).
        self.out = keras.layers.Dense(layers * 2 * heads * dim, kernel_initializer="zeros", name="out")
        self.hidden.build(init.shape)
        self.out.build((init.shape[0], projection))
        self.built = True

    def generate(self):
        return keras.ops.reshape(self.out(self.hidden(self.embedding)), self.shape_out)


class PrefixAttention(keras.layers.Layer):
    """A frozen multi-head self-attention whose keys and values start with learned prefix vectors."""

    def __init__(self, base: keras.layers.MultiHeadAttention, length: int, index: int, **kwargs):
        super().__init__(name=f"{base.name}_prefix", dtype=base.dtype_policy, **kwargs)
        self.base, self.length, self.index = base, length, index
        heads, key_dim = base.num_heads, base.key_dim
        value_dim = base.value_dim or key_dim
        self.prefix_key = self.add_weight(name="prefix_key", shape=(length, heads, key_dim),
                                          initializer="zeros")
        self.prefix_value = self.add_weight(name="prefix_value", shape=(length, heads, value_dim),
                                            initializer="zeros")
        object.__setattr__(self, "_encoder", None)  # shared by all layers; tracked by layer 0 only

    def prefixes(self):
        if self._encoder is None:
            return self.prefix_key, self.prefix_value
        generated = self._encoder.generate()[:, self.index]
        return self.prefix_key + generated[:, 0], self.prefix_value + generated[:, 1]

    def call(self, query, value, key=None, attention_mask=None, return_attention_scores=False,
             training=None, **kwargs):
        base = self.base
        q = base._query_dense(query)
        k = base._key_dense(value if key is None else key)
        v = base._value_dense(value)
        batch = keras.ops.shape(k)[0]
        prefix_key, prefix_value = self.prefixes()

        def extend(x, prefix):
            prefix = keras.ops.broadcast_to(keras.ops.cast(prefix, x.dtype)[None],
                                            (batch, self.length, *prefix.shape[1:]))
            return keras.ops.concatenate([prefix, x], axis=1)

        k, v = extend(k, prefix_key), extend(v, prefix_value)
        if attention_mask is not None:  # [batch, queries, keys]: every query sees the prefix
            ones = keras.ops.ones((batch, keras.ops.shape(attention_mask)[1], self.length),
                                  dtype=attention_mask.dtype)
            attention_mask = keras.ops.concatenate([ones, attention_mask], axis=2)
        out, scores = base._compute_attention(q, k, v, attention_mask, training, return_attention_scores)
        out = base._output_dense(out)
        return (out, scores) if return_attention_scores else out


def _attention_layers(backbone) -> list[tuple]:
    slots = []
    for block in backbones.transformer_layers(backbone):
        layer = getattr(block, "_self_attention_layer", None)
        if not isinstance(layer, (keras.layers.MultiHeadAttention, PrefixAttention)) or getattr(
                layer, "_use_gate", False):
            raise FlagError(f"--method=prefix: {block.name} has no plain multi-head self-attention; "
                            "prefix tuning supports keras-hub TransformerEncoder blocks")
        slots.append((block, layer))
    return slots


def _block_inputs(backbone, ids: np.ndarray) -> list:
    """What every transformer block receives when the backbone reads the words `ids` as one text:
    the initial prefixes are each layer's own keys and values of real hidden states."""
    blocks = backbones.transformer_layers(backbone)
    captured = []

    def call_function(layer, *args, **kwargs):
        if any(layer is block for block in blocks):
            captured.append(args[0])
        return layer(*args, **kwargs)

    probe = keras.models.clone_model(backbone, clone_function=lambda layer: layer,
                                     call_function=call_function)
    ids = np.asarray(ids, "int32")[None]
    feed = {name: (ids if name == "token_ids" else
                   np.ones_like(ids) if name == "padding_mask" else np.zeros_like(ids))
            for name in probe.input}
    return [np.asarray(x) for x in keras.Model(probe.input, captured)(feed, training=False)]


def apply(backbone, config, vocabulary=None):
    length, projection = config.prefix_length, config.prefix_projection
    if length < 1:
        raise FlagError(f"--prefix_length={length}: must be at least 1")
    if projection < 0:
        raise FlagError(f"--prefix_projection={projection}: 0 (off) or the MLP's hidden size")
    slots = _attention_layers(backbone)
    for variable in backbone.weights:
        variable.trainable = False
    states = _block_inputs(backbone, word_ids(vocabulary, int(backbone.token_embedding.input_dim), length,
                                             config.seed))
    wrappers = []
    for index, (block, base) in enumerate(slots):
        wrapper = PrefixAttention(base, length, index)
        wrapper.prefix_key.assign(keras.ops.convert_to_numpy(base._key_dense(states[index]))[0])
        wrapper.prefix_value.assign(keras.ops.convert_to_numpy(base._value_dense(states[index]))[0])
        backbones.replace_sublayer(block, "_self_attention_layer", wrapper)
        wrappers.append(wrapper)
    info = {"method": "prefix", "prefix_length": length, "layers": len(wrappers)}
    if projection:
        first = wrappers[0]
        encoder = PrefixEncoder(states[0][0].astype("float32"), len(wrappers), first.base.num_heads,
                                first.base.key_dim, projection, name="prefix_encoder")
        first.encoder = encoder  # tracked once, by the first layer
        for wrapper in wrappers:
            wrapper.prefix_key.trainable = wrapper.prefix_value.trainable = False
            object.__setattr__(wrapper, "_encoder", encoder)
        info["projection"] = projection
    return backbone, info


def fold(backbone) -> bool:
    """Replaces the reparameterisation by the vectors it computes now; False when there is none."""
    wrappers = [layer for _, layer in _attention_layers(backbone) if isinstance(layer, PrefixAttention)]
    encoder = wrappers[0]._encoder if wrappers else None
    if encoder is None:
        return False
    for wrapper in wrappers:
        key, value = wrapper.prefixes()
        wrapper.prefix_key.assign(key)
        wrapper.prefix_value.assign(value)
        object.__setattr__(wrapper, "_encoder", None)
    first = wrappers[0]
    first._tracker.unlock()
    first.encoder = None
    first._layers[:] = [x for x in first._layers if x is not encoder]
    first._tracker.lock()
    return True
