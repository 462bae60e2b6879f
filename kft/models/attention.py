"""Attention whose backward pass keeps no [queries, keys] tensor: the FlashAttention-2 recurrence in
TensorFlow ops.

`flash_attention` walks the keys in blocks of `block_size`. The forward pass keeps, per query row, a
running maximum m, a running sum l of exp(score - m) and an output accumulator, rescaling both when
m grows (online softmax); at the end O = acc / l and the row's log-sum-exp L = m + log(l). Only Q,
K, V, O and L are kept for the backward pass (a `tf.custom_gradient`), which walks the key blocks
again, recomputes each block's probabilities P = exp(S - L) from Q, K and L, and accumulates

    dV_j = P^T dO,  dP = dO V_j^T,  dS = P * (dP - D) with D = rowsum(dO * O),
    dQ += dS K_j * scale,  dK_j = dS^T Q * scale.

The largest tensors either pass creates are one block's scores, [batch, heads, queries, block].

Masks are never formed for the whole sequence: each block's boolean [batch, queries, block] mask is
built from the parts given (causal order, a [batch, keys] key padding mask, segment ids of packed
rows, a sliding window, a user function of the block's query and key positions, or, as a fallback,
slices of a dense [batch, queries, keys] mask). A query row with no allowed key (a padding query of a
packed row) gets output 0 and zero gradients.

Grouped-query attention: `key` and `value` may have fewer heads than `query` (a divisor of them);
query head h reads key/value head h // (query heads / kv heads), the order of keras-hub's
`ops.repeat(key, groups, axis=2)`. K and V are not repeated; the query heads of a group are folded
into the query rows of their kv head.

Layout follows keras-hub: query [batch, queries, heads, head_dim], key/value [batch, keys, kv_heads,
head_dim], output like query. float32 and bfloat16/float16 inputs; scores, softmax statistics and
accumulators are float32, the output and gradients are cast back to the inputs' dtypes.

`use_memory_efficient_attention(backbone)` makes the llama-family attention layers of a keras-hub
backbone (Llama, Mistral, Qwen, Qwen3) compute with this kernel.
"""

from __future__ import annotations

import math

import tensorflow as tf


# -- masks --------------------------------------------------------------------------------------------

class _Mask:
    """The allowed (query, key) pairs, built one key block at a time.

    Key-side tensors are padded to the padded key length once (O(keys)); `block(start)` returns a
    bool tensor broadcastable to [batch, queries, block].
    """

    def __init__(self, nq, nk, nk_padded, block_size, causal, causal_offset, key_padding,
                 segment_ids, key_segment_ids, sliding_window, mask, mask_fn):
        self.nq, self.nk, self.block_size = nq, nk, block_size
        self.causal, self.sliding_window, self.mask_fn = causal, sliding_window, mask_fn
        self.q_pos = tf.range(nq, dtype=tf.int32) + tf.cast(causal_offset, tf.int32)
        extra = nk_padded - nk
        self.key_padding = None
        if key_padding is not None:
            self.key_padding = tf.pad(tf.cast(key_padding, tf.bool), [[0, 0], [0, extra]])
        self.q_segments = self.k_segments = None
        if segment_ids is not None:
            self.q_segments = tf.cast(segment_ids, tf.int32)
            k_seg = self.q_segments if key_segment_ids is None else tf.cast(key_segment_ids, tf.int32)
            self.k_segments = tf.pad(k_seg, [[0, 0], [0, extra]])
        self.dense = None
        if mask is not None:
            self.dense = tf.pad(tf.cast(mask, tf.bool), [[0, 0], [0, 0], [0, extra]])

    def block(self, start):
        bs = self.block_size
        k_pos = start + tf.range(bs, dtype=tf.int32)
        allowed = (k_pos < self.nk)[None, None, :]  # keys added to fill the last block
        if self.causal:
            allowed = tf.logical_and(allowed, (k_pos[None, :] <= self.q_pos[:, None])[None])
        if self.sliding_window is not None:
            allowed = tf.logical_and(
                allowed, (self.q_pos[:, None] - k_pos[None, :] < self.sliding_window)[None])
        if self.key_padding is not None:
            allowed = tf.logical_and(allowed, tf.slice(self.key_padding, [0, start], [-1, bs])[:, None])
        if self.q_segments is not None:
            k_seg = tf.slice(self.k_segments, [0, start], [-1, bs])
            same = tf.equal(self.q_segments[:, :, None], k_seg[:, None, :])
            allowed = tf.logical_and(allowed, same)
        if self.dense is not None:
            allowed = tf.logical_and(allowed, tf.slice(self.dense, [0, 0, start], [-1, -1, bs]))
        if self.mask_fn is not None:
            allowed = tf.logical_and(allowed, tf.cast(self.mask_fn(self.q_pos, k_pos), tf.bool))
        return allowed


def dense_mask(nq, nk, batch=1, causal=True, causal_offset=0, key_padding=None, segment_ids=None,
               key_segment_ids=None, sliding_window=None, mask=None, mask_fn=None):
    """The whole bool [batch, nq, nk] mask `flash_attention` applies for these arguments (for checks
    and the plain reference; the kernel itself never builds it)."""
    spec = _Mask(nq, nk, nk, nk, causal, causal_offset, key_padding, segment_ids, key_segment_ids,
                 sliding_window, mask, mask_fn)
    return tf.broadcast_to(spec.block(0), [batch, nq, nk])


# -- the kernel ---------------------------------------------------------------------------------------

def _dim(t, i):
    """The static size of axis i where known (keeps shapes static through reshapes), else dynamic."""
    return t.shape[i] if t.shape[i] is not None else tf.shape(t)[i]


def _blocks(nk, block_size):
    num = (nk + block_size - 1) // block_size
    return num, num * block_size


def _mask_scores(s, allowed, b, kvh, groups, nq, bs):
    """s [b, kvh, groups * nq, bs] float32 -> the same with disallowed entries set to -inf."""
    s5 = tf.reshape(s, [b, kvh, groups, nq, bs])
    s5 = tf.where(allowed[:, None, None], s5, tf.constant(-math.inf, s.dtype))
    return tf.reshape(s5, [b, kvh, groups * nq, bs])


def flash_attention(query, key, value, *, causal=True, key_padding=None, segment_ids=None,
                    key_segment_ids=None, mask=None, mask_fn=None, sliding_window=None, scale=None,
                    causal_offset=0, block_size=64, parallel_iterations=1):
    """softmax(Q K^T * scale + mask) V, blockwise over keys, with an O(sequence) backward pass.

    Args:
      query: [batch, nq, heads, head_dim].
      key, value: [batch, nk, kv_heads, head_dim]; heads % kv_heads == 0.
      causal: query i (at position i + causal_offset) sees keys at positions <= its own.
      key_padding: [batch, nk], nonzero/True for real keys.
      segment_ids: [batch, nq] ints; a query sees only keys with its own id (`key_segment_ids`
        [batch, nk] for the keys, default the same ids: packed self-attention). Padding usually
        carries its own id (0) and is excluded by `key_padding`.
      mask: dense bool [batch, nq, nk] fallback (sliced per block; it is kept for the backward pass,
        so it costs batch * nq * nk bytes, shared by all heads).
      mask_fn: fn(q_positions [nq] int32, k_positions [block] int32) -> bool broadcastable to
        [batch, nq, block]; it may close over tensors (they get no gradient).
      sliding_window: a query sees keys less than this many positions behind it.
      scale: multiplies the scores; default 1/sqrt(head_dim).
      block_size: keys per block (64 or 128 are good choices).
      parallel_iterations: of the tf.while_loops; 1 keeps one block's scores alive at a time.

    Returns [batch, nq, heads, head_dim] in query's dtype. Rows with no allowed key are 0.
    Works in eager mode, inside tf.function with unknown lengths, and under XLA (jit_compile).
    """
    query = tf.convert_to_tensor(query)
    key = tf.convert_to_tensor(key)
    value = tf.convert_to_tensor(value)
    geometry = _Blockwise(query, key, scale, int(block_size), parallel_iterations)
    geometry.spec = _Mask(geometry.nq, geometry.nk, geometry.nk_padded, geometry.bs, causal, causal_offset,
                          key_padding, segment_ids, key_segment_ids, sliding_window, mask, mask_fn)
    dtypes = query.dtype, key.dtype, value.dtype

    @tf.custom_gradient
    def attend(q, k, v):
        # An eager GradientTape records the ops run inside a custom gradient's forward function and
        # would keep every block's probabilities alive; computing from stopped copies records none.
        out, lse = geometry.forward(tf.stop_gradient(q), tf.stop_gradient(k), tf.stop_gradient(v))
        # The returned output is also what D is computed from: the next layer (the output
        # projection) keeps it anyway, so the backward pass holds no extra copy of O.
        output = tf.cast(geometry.from_rows(out), dtypes[0])

        def grad(d_out):
            return geometry.backward(q, k, v, output, lse, d_out, dtypes)

        return output, grad

    result = attend(query, key, value)
    result.set_shape(query.shape)
    return result


class _Blockwise:
    """The shapes of one attention call and its blockwise forward and backward passes.

    Query heads are folded into the rows of their kv head ([b, kvh, groups * nq, d]), so grouped
    K/V are never repeated; keys are zero-padded to whole blocks of `bs`.
    """

    def __init__(self, query, key, scale, bs: int, parallel_iterations: int):
        head_dim = query.shape[-1]
        if scale is None:
            if head_dim is None:
                scale = tf.math.rsqrt(tf.cast(tf.shape(query)[-1], tf.float32))
            else:
                scale = 1.0 / math.sqrt(head_dim)
        self.scale = tf.cast(scale, tf.float32)
        self.bs, self.parallel_iterations = bs, parallel_iterations
        self.b, self.nq, self.heads, self.d = (_dim(query, i) for i in range(4))
        self.nk, self.kvh = _dim(key, 1), _dim(key, 2)
        self.groups = self.heads // self.kvh
        self.rows = self.groups * self.nq
        self.num_blocks, self.nk_padded = _blocks(self.nk, bs)
        self.spec = None  # the _Mask, set by the caller

    def to_rows(self, t):  # [b, nq, heads, d] -> [b, kvh, groups * nq, d] float32
        t = tf.reshape(tf.cast(t, tf.float32), [self.b, self.nq, self.kvh, self.groups, self.d])
        return tf.reshape(tf.transpose(t, [0, 2, 3, 1, 4]), [self.b, self.kvh, self.rows, self.d])

    def from_rows(self, t):  # inverse of to_rows
        t = tf.transpose(tf.reshape(t, [self.b, self.kvh, self.groups, self.nq, self.d]), [0, 3, 1, 2, 4])
        return tf.reshape(t, [self.b, self.nq, self.heads, self.d])

    def to_keys(self, t):  # [b, nk, kvh, d] -> [b, kvh, nk_padded, d] float32, zero-padded
        t = tf.transpose(tf.cast(t, tf.float32), [0, 2, 1, 3])
        return tf.pad(t, [[0, 0], [0, 0], [0, self.nk_padded - self.nk], [0, 0]])

    def key_block(self, t, start):  # constant-size slice (a dynamic slice under XLA)
        return tf.slice(t, [0, 0, start, 0], [-1, -1, self.bs, -1])

    def scores(self, q_scaled, k_block, start):
        s = tf.matmul(q_scaled, k_block, transpose_b=True)  # [b, kvh, rows, bs]
        return _mask_scores(s, self.spec.block(start), self.b, self.kvh, self.groups, self.nq, self.bs)

    def _loop(self, body, initial):
        return tf.while_loop(lambda j, *_: j < self.num_blocks, body, (0, *initial),
                             parallel_iterations=self.parallel_iterations)[1:]

    def forward(self, q, k, v):
        """(output rows [b, kvh, rows, d], each row's log-sum-exp): the online-softmax recurrence."""
        q_scaled = self.to_rows(q) * self.scale
        k_all, v_all = self.to_keys(k), self.to_keys(v)

        def step(j, m, l, acc):
            start = j * self.bs
            s = self.scores(q_scaled, self.key_block(k_all, start), start)
            m_new = tf.maximum(m, tf.reduce_max(s, axis=-1))
            m_ref = tf.where(tf.math.is_finite(m_new), m_new, tf.zeros_like(m_new))  # all masked so far
            p = tf.exp(s - m_ref[..., None])
            alpha = tf.exp(m - m_ref)
            l = alpha * l + tf.reduce_sum(p, axis=-1)
            acc = alpha[..., None] * acc + tf.matmul(p, self.key_block(v_all, start))
            return j + 1, m_new, l, acc

        stat_shape = tf.stack([self.b, self.kvh, self.rows])
        m, l, acc = self._loop(step, (tf.fill(stat_shape, tf.constant(-math.inf, tf.float32)),
                                      tf.zeros(stat_shape, tf.float32),
                                      tf.zeros(tf.stack([self.b, self.kvh, self.rows, self.d]), tf.float32)))
        seen = l > 0
        out = tf.math.divide_no_nan(acc, l[..., None])  # rows with no allowed key: 0
        lse = tf.where(seen, m + tf.math.log(tf.where(seen, l, tf.ones_like(l))), tf.zeros_like(l))
        return out, lse

    def backward(self, q, k, v, output, lse, d_out, dtypes):
        """dq, dk, dv: each block's probabilities recomputed from Q, K and the log-sum-exp."""
        d_rows = self.to_rows(d_out)
        q_scaled = self.to_rows(q) * self.scale
        k_all, v_all = self.to_keys(k), self.to_keys(v)
        delta = tf.reduce_sum(d_rows * self.to_rows(output), axis=-1)  # D = rowsum(dO * O)

        def back(j, dq, dk_parts, dv_parts):
            start = j * self.bs
            k_j, v_j = self.key_block(k_all, start), self.key_block(v_all, start)
            p = tf.exp(self.scores(q_scaled, k_j, start) - lse[..., None])  # masked: exp(-inf) = 0
            dv_j = tf.matmul(p, d_rows, transpose_a=True)  # [b, kvh, bs, d], summed over groups
            ds = p * (tf.matmul(d_rows, v_j, transpose_b=True) - delta[..., None])
            dk_j = tf.matmul(ds, q_scaled, transpose_a=True)  # q_scaled carries the scale
            return j + 1, dq + tf.matmul(ds, k_j), dk_parts.write(j, dk_j), dv_parts.write(j, dv_j)

        parts = dict(dtype=tf.float32, size=self.num_blocks, element_shape=tf.TensorShape([None, None, self.bs, None]))
        dq, dk_parts, dv_parts = self._loop(back, (tf.zeros_like(q_scaled), tf.TensorArray(**parts),
                                                   tf.TensorArray(**parts)))
        return (tf.cast(self.from_rows(dq * self.scale), dtypes[0]), self._gathered(dk_parts, dtypes[1]),
                self._gathered(dv_parts, dtypes[2]))

    def _gathered(self, ta, dtype):  # [blocks, b, kvh, bs, d] -> [b, nk, kvh, d]
        t = tf.transpose(ta.stack(), [1, 2, 0, 3, 4])
        t = tf.reshape(t, [self.b, self.kvh, self.nk_padded, self.d])[:, :, :self.nk]
        return tf.cast(tf.transpose(t, [0, 2, 1, 3]), dtype)


def reference_attention(query, key, value, *, scale=None, **mask_args):
    """softmax(Q K^T * scale + mask) V formed plainly (the [batch, heads, nq, nk] scores), for checks;
    rows with no allowed key give 0, as in `flash_attention`."""
    query, key, value = (tf.cast(t, tf.float32) for t in (query, key, value))
    heads, kvh = query.shape[2], key.shape[2]
    if heads != kvh:
        key = tf.repeat(key, heads // kvh, axis=2)
        value = tf.repeat(value, heads // kvh, axis=2)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    s = tf.einsum("bquh,bkuh->buqk", query, key) * scale
    allowed = dense_mask(tf.shape(query)[1], tf.shape(key)[1], tf.shape(query)[0], **mask_args)
    allowed = allowed[:, None]
    p = tf.nn.softmax(tf.where(allowed, s, -1e9), axis=-1) * tf.cast(allowed, tf.float32)
    return tf.einsum("buqk,bkuh->bquh", p, value)


# -- wiring into keras-hub's llama-family decoders ----------------------------------------------------

# keras-hub attention layers that repeat K/V per query head, then call
# `_compute_attention(query, key, value, attention_mask, ...)` with the mask their decoder block's
# `_compute_self_attention_mask` built.
_SUPPORTED = ("LlamaAttention", "CachedMistralAttention", "CachedMixtralAttention", "QwenAttention",
              "QwenMoeAttention", "Qwen3Attention")


class MaskParts:
    """What a patched decoder block hands its attention layer instead of a dense [b, n, n] mask.

    Held as a plain Python object (not a tensor) so that keras passes it through unchanged.
    """

    def __init__(self, padding=None, segment_ids=None, dense=None, sliding_window=None):
        self.padding, self.segment_ids = padding, segment_ids
        self.dense, self.sliding_window = dense, sliding_window


def _patched_mask(block, original):
    def compute(decoder_sequence, decoder_padding_mask, decoder_attention_mask, self_attention_cache,
                self_attention_cache_update_index):
        if self_attention_cache is not None:  # cached generation: keras-hub's own path
            if decoder_attention_mask is not None and len(decoder_attention_mask.shape) == 2:
                decoder_attention_mask = segment_dense_mask(decoder_attention_mask)
            return original(decoder_sequence, decoder_padding_mask, decoder_attention_mask,
                            self_attention_cache, self_attention_cache_update_index)
        padding = decoder_padding_mask
        if padding is None:
            padding = getattr(decoder_sequence, "_keras_mask", None)
        segments = dense = None
        if decoder_attention_mask is not None:
            if len(decoder_attention_mask.shape) == 2:  # [batch, length]: segment ids of packed rows
                segments = decoder_attention_mask
            else:
                dense = tf.cast(decoder_attention_mask, tf.bool)
        return MaskParts(padding, segments, dense, getattr(block, "sliding_window", None))
    return compute


def _patched_attention(layer, original, block_size):
    def compute(query, key, value, attention_mask=None, *args, **kwargs):
        if not isinstance(attention_mask, MaskParts):  # e.g. cached generation
            return original(query, key, value, attention_mask, *args, **kwargs)
        groups = layer.num_key_value_groups if hasattr(layer, "num_key_value_groups") \
            else layer._num_key_value_groups
        if groups > 1:  # keras-hub repeated K/V per query head; take one copy per kv head back
            key, value = key[:, :, ::groups], value[:, :, ::groups]
        window = attention_mask.sliding_window
        if getattr(layer, "use_sliding_window_attention", False):
            window = layer.sliding_window_size
        elif type(layer).__name__ == "Qwen3Attention" and getattr(layer, "sliding_window_size", None):
            window = layer.sliding_window_size
        return flash_attention(
            query, key, value, causal=True, key_padding=attention_mask.padding,
            segment_ids=attention_mask.segment_ids, mask=attention_mask.dense, sliding_window=window,
            scale=layer._inv_norm_factor, block_size=block_size)
    return compute


def use_memory_efficient_attention(backbone, block_size: int = 128) -> int:
    """Makes every llama-family self-attention layer of `backbone` (keras-hub's Llama, Mistral,
    Mixtral, Qwen, Qwen-MoE and Qwen3 blocks) compute with `flash_attention`; returns how many layers
    were switched.

    Per block instance (no class is changed): the block's `_compute_self_attention_mask` returns the
    mask's parts (key padding, segment ids or a dense mask, sliding window) instead of the dense
    [batch, n, n] mask, and its attention layer's `_compute_attention` hands them to the kernel.
    Cached generation (a KV cache) keeps keras-hub's own code. A block so switched also accepts
    segment ids [batch, n] as `decoder_attention_mask` (see `call_block`).
    Idempotent; weights, LoRA wrappers of the projections and saved checkpoints are unaffected.
    """
    count = 0
    for block in getattr(backbone, "transformer_layers", None) or []:
        layer = getattr(block, "_self_attention_layer", None)
        if layer is None or type(layer).__name__ not in _SUPPORTED:
            continue
        if getattr(block, "_memory_efficient_attention", False):
            count += 1
            continue
        block._memory_efficient_attention = True
        block._compute_self_attention_mask = _patched_mask(block, block._compute_self_attention_mask)
        layer._compute_attention = _patched_attention(layer, layer._compute_attention, block_size)
        count += 1
    return count


def restore_attention(backbone) -> int:
    """Undoes `use_memory_efficient_attention` (keras-hub's own attention again); returns how many
    blocks were switched back."""
    count = 0
    for block in getattr(backbone, "transformer_layers", None) or []:
        if not getattr(block, "_memory_efficient_attention", False):
            continue
        del block._compute_self_attention_mask  # the instance attributes hide the class's methods
        del block._self_attention_layer._compute_attention
        block._memory_efficient_attention = False
        count += 1
    return count


def uses_memory_efficient_attention(block) -> bool:
    return bool(getattr(block, "_memory_efficient_attention", False))


def segment_dense_mask(segment_ids):
    """[batch, n] segment ids -> int32 [batch, n, n]: 1 where query and key share a segment."""
    return tf.cast(tf.equal(segment_ids[:, :, None], segment_ids[:, None, :]), tf.int32)


def call_block(block, x, padding_mask, segment_ids=None, training=None):
    """One decoder block over (packed) rows: a switched block gets the segment ids themselves,
    any other block the dense same-segment mask keras-hub expects."""
    if segment_ids is None:
        return block(x, decoder_padding_mask=padding_mask, training=training)
    mask = segment_ids if uses_memory_efficient_attention(block) else segment_dense_mask(segment_ids)
    return block(x, decoder_padding_mask=padding_mask, decoder_attention_mask=mask, training=training)


__all__ = ["flash_attention", "reference_attention", "dense_mask", "use_memory_efficient_attention",
           "restore_attention", "uses_memory_efficient_attention", "call_block", "segment_dense_mask",
           "MaskParts"]
