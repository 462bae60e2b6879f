"""The decoder as the training loop sees it, its loss on completion tokens, and batched generation.

The model returns the backbone's hidden states; the loss projects only the trained positions
through the (tied) output embedding. A completion is typically a fifth of a sequence, and the
vocabulary projection (576 x 49,152 for SmolLM2) is a quarter of a small model's compute, so
the logits of prompt positions are never formed.
"""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from kft.models import attention, backbones


def build_model(backbone: keras.Model, packed: bool = False) -> keras.Model:
    """token_ids, padding_mask [batch, length] -> hidden states; `packed`: also reads segment_ids."""
    if packed:
        model = PackedCausalLM(backbone)
        ones = np.ones((1, 2), np.int32)
        model({"token_ids": ones, "padding_mask": ones, "segment_ids": ones})  # builds it
        return model
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, hidden, name="causal_lm")


class PackedCausalLM(keras.Model):
    """The decoder over packed rows (kft/tasks/causal_lm/packing.py): with segment_ids in the
    features each position attends only to earlier positions of its own example; without them
    (evaluation, generation) it is the backbone itself.

    The llama backbone's own graph takes no attention mask, so its blocks are called here in the
    same order (token embedding, the decoder blocks, the final norm) with one more mask.
    """

    def __init__(self, backbone: keras.Model, **kwargs):
        super().__init__(name="causal_lm", **kwargs)
        self.backbone = backbone

    def call(self, inputs, training=False):
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        segments = inputs.get("segment_ids")
        if segments is None:
            return self.backbone({"token_ids": token_ids, "padding_mask": padding_mask}, training=training)
        x = self.backbone.token_embedding(token_ids)
        for block in self.backbone.transformer_layers:  # merged with the padding and causal masks
            # a memory-efficient block takes the segment ids themselves: no [length x length] mask kept
            x = attention.call_block(block, x, padding_mask, segments, training=training)
        return self.backbone.layer_norm(x)


def token_embedding(model: keras.Model):
    """The (reversible) token embedding, also inside a backbone rebuilt by prompt tuning."""
    return backbones.nested_layer(model, lambda layer: layer.name == "token_embedding")


def _embedding_logits(model: keras.Model):
    """hidden [..., h] -> logits [..., vocabulary] through the model's tied token embedding."""
    embedding = token_embedding(model)
    return lambda hidden: embedding(hidden, reverse=True)


def token_scores(logits_of, hidden, labels):
    """(per-position cross-entropy [k], whether argmax is the target [k], where [k, 2]) at labels >= 0.

    Only the trained positions are projected by `logits_of` (hidden [k, h] -> logits [k, vocabulary];
    the generating tasks' output layers differ)."""
    where = tf.where(labels >= 0)
    picked = tf.gather_nd(hidden, where)
    logits = tf.cast(logits_of(picked), tf.float32)
    targets = tf.gather_nd(labels, where)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), targets), tf.float32)
    return ce, correct, where


def summed_loss(logits_of):
    """fn(labels [b, t], hidden [b, t, h]) -> summed cross-entropy of each example's trained tokens [b];
    the loop divides by the global batch's trained tokens (a per-token mean)."""

    def loss(labels, hidden):
        ce, _, where = token_scores(logits_of, hidden, labels)
        return tf.math.unsorted_segment_sum(ce, where[:, 0], tf.shape(labels)[0])

    return loss


def loss_function(model: keras.Model):
    """The loss on a decoder's completion tokens (see `summed_loss`)."""
    return summed_loss(_embedding_logits(model))


def predict_function(model: keras.Model):
    """fn(features, labels) -> [b, t, 2]: each trained position's cross-entropy and argmax hit."""
    logits_of = _embedding_logits(model)

    def predict(features, labels):
        hidden = model(features, training=False)
        ce, correct, where = token_scores(logits_of, hidden, labels)
        shape = tf.concat([tf.shape(labels, out_type=tf.int64), [2]], axis=0)
        return tf.scatter_nd(where, tf.stack([ce, correct], axis=-1), shape)

    return predict


class Generator:
    """Greedy generation over keras-hub's KV cache (`_build_cache` / `call_with_cache`, which every
    keras-hub CausalLM has) for the current weights.

    keras-hub's own `generate` runs its decode loop as a TensorFlow while-loop that carries the whole
    cache ([batch, layers, 2, width, heads, head_dim]) as a loop variable. Here one compiled decode
    step per token is called from Python (1.3x faster on CPU, same tokens), for llama-family models
    over a cache updated in place (`InPlaceLlamaCache`, 2x; PERFORMANCE.md), and the loop stops as
    soon as every row has ended. Prompts are right-padded. Over the in-place cache every row decodes
    from its own length (per-row positions); over keras-hub's cache the batch shares one position and
    a longer row takes its own prompt tokens until its length. Either way a row's output does not
    depend on the other rows of its batch. Batches are formed in length order with a fixed row count
    and widths rounded up to `width_step`, so the compiled functions see few shapes.
    """

    def __init__(self, backbone: keras.Model, causal_lm_class: type, stop_ids: list[int], pad_id: int,
                 batch_size: int, width_step: int = 64, prompt=None):
        self.lm = causal_lm_class(backbone=backbone, preprocessor=None)
        self.stop_ids = list(stop_ids)
        self.pad_id = int(pad_id)
        self.batch_size, self.width_step = batch_size, width_step
        # Prompt tuning: the learned vectors sit after position 0, so every real token from position
        # 1 on is `shift` places further along the cache (and the rotary positions) than its index.
        self.prompt, self.shift = prompt, (prompt.num_tokens if prompt is not None else 0)
        lm = self.lm
        # reduce_retracing: after the second batch width, one shape-generic graph serves every width
        # (a 30-layer trace costs seconds; one per width was most of a DialogSum evaluation).
        if prompt is not None:
            check_prompt_generation(lm)

        def prefill(ids):
            return lm._build_cache(ids)[1] if prompt is None else _prefill_with_prompt(lm, prompt, ids)

        self._prefill = tf.function(prefill, reduce_retracing=True)
        shift = self.shift

        @tf.function(reduce_retracing=True)
        def step(token, cache, index):
            logits, _, cache = lm.call_with_cache(token, cache, index + shift)
            return tf.argmax(logits[:, -1, :], axis=-1, output_type=tf.int32), cache

        self._step = step
        self._fast = None

    def __call__(self, prompts: list[np.ndarray], max_new_tokens: int, limit: int | None = None):
        """Generated ids of each prompt (stop token excluded) and whether it stopped before the cap."""
        order = np.argsort([len(p) for p in prompts], kind="stable")
        out, stopped = [None] * len(prompts), [False] * len(prompts)
        stop = np.asarray(self.stop_ids)
        widest = -(-(max(len(p) for p in prompts) + max_new_tokens) // self.width_step) * self.width_step
        fast = None
        if isinstance(self.lm, keras_hub.models.LlamaCausalLM):
            width = widest + self.shift
            if self._fast is None or self._fast.width < width:
                self._fast = InPlaceLlamaCache(self.lm, self.batch_size, width)
            fast = self._fast
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            lengths = np.asarray([len(prompts[i]) for i in rows])
            width = -(-(lengths.max() + max_new_tokens) // self.width_step) * self.width_step
            if limit:
                width = min(width, limit)
            ids = np.full((self.batch_size, width), self.pad_id, np.int32)
            for r, i in enumerate(rows):
                ids[r, :len(prompts[i])] = prompts[i]
            # Filler rows repeat the first row; they never hold up the early stop below.
            ids[len(rows):] = ids[0]
            lengths = np.concatenate([lengths, np.full(self.batch_size - len(rows), lengths[0])])
            ends = np.minimum(lengths + max_new_tokens, width)
            done = np.zeros(self.batch_size, bool)
            done[len(rows):] = True
            hit = np.zeros(self.batch_size, bool)
            if fast is not None:
                self._decode_per_row(fast, ids, lengths, ends, done, hit, stop)
            else:
                self._decode_in_step(ids, lengths, ends, done, hit, stop)
            for r, i in enumerate(rows):
                new = ids[r, lengths[r]:ends[r]]
                cut = np.flatnonzero(np.isin(new, stop))
                stopped[i] = bool(hit[r])
                out[i] = new[:cut[0]] if hit[r] and cut.size else new[:max(0, ends[r] - lengths[r])]
        return out, stopped

    def _decode_per_row(self, fast, ids, lengths, ends, done, hit, stop):
        """Every row decodes from its own prompt length (in-place cache, per-row positions).

        The prefill covers the longest prompt but its last token; a shorter row's cache then holds
        its padding's keys past its prompt, which stay masked until its own steps overwrite them.
        So no row feeds its prompt one token at a time while it waits for the longest one, and the
        prefill stops at the prompts instead of the full width (PERFORMANCE.md).
        """
        rows = np.arange(len(ids))
        done |= ends <= lengths  # no room left after the prompt
        fast.load(self._prefill(tf.constant(ids[:, :max(int(lengths.max()) - 1, 1)])))
        pos = lengths - 1  # each row feeds the token at `pos` and receives the one at `pos + 1`
        while not done.all():
            token = fast.step(tf.constant(ids[rows, pos][:, None]), tf.constant(pos + self.shift, tf.int32))
            token = token.numpy()
            free = ~done
            ids[free, pos[free] + 1] = token[free]
            new_hit = free & np.isin(token, stop)
            hit |= new_hit
            done |= new_hit | (free & (pos + 2 >= ends))
            pos = np.where(done, pos, pos + 1)  # finished rows stay where they are, inside the cache

    def _decode_in_step(self, ids, lengths, ends, done, hit, stop):
        """keras-hub's cache: one position for the whole batch, from the shortest prompt on; a longer
        row takes its own prompt tokens until its length."""
        cache = self._prefill(tf.constant(ids))
        # A first prompt token must come before the learned vectors: start at position >= 1.
        for t in range(max(int(lengths.min()), 1 if self.shift else 0), int(ends.max())):
            token, cache = self._step(tf.constant(ids[:, t - 1:t]), cache, tf.constant(t - 1))
            token = token.numpy()
            free = (t >= lengths) & ~done
            ids[free, t] = token[free]
            new_hit = free & np.isin(token, stop)
            hit |= new_hit
            done |= new_hit | (free & (t + 1 >= ends))
            if done.all():
                break


class InPlaceLlamaCache:
    """The decode step of keras-hub's llama-family decoders over a KV cache updated in place.

    keras-hub's `call_with_cache` returns a new [batch, layers, 2, width, kv_heads, head_dim] cache at
    every token: each layer's slice is cut out, updated into a copy, its keys and values repeated
    for every query head of their group, and all layers stacked back, so a step moves several
    copies of the whole cache (0.2 s per token for 8 DialogSum rows on this CPU, almost all of it
    memory traffic). Here each layer's keys and values are variables of width `width`; a step
    writes one position and attends over the variables with the query heads grouped onto their
    key/value head, as keras-hub's repeat does. The arithmetic is keras-hub's own layers (norms,
    projections, LoRA wrappers, rotary embedding); a test checks the chosen tokens against the
    training graph's argmax one token at a time. The prefill still runs through keras-hub.
    """

    def __init__(self, lm, batch: int, width: int):
        backbone = lm.backbone
        self.lm, self.batch, self.width = lm, batch, width
        head_dim = backbone.hidden_dim // backbone.num_query_heads
        shape = [batch, width, backbone.num_key_value_heads, head_dim]
        dtype = lm.compute_dtype
        self.keys = [tf.Variable(tf.zeros(shape, dtype), trainable=False) for _ in backbone.transformer_layers]
        self.values = [tf.Variable(tf.zeros(shape, dtype), trainable=False) for _ in backbone.transformer_layers]
        self.load = tf.function(self._load, reduce_retracing=True)
        self.step = tf.function(self._step, reduce_retracing=True)

    def _load(self, cache):
        """Copies a keras-hub cache [batch, layers, 2, w, kv, hd] (w <= width) into the variables."""
        w = tf.shape(cache)[3]
        for i in range(len(self.keys)):
            self.keys[i][:, :w].assign(cache[:, i, 0])
            self.values[i][:, :w].assign(cache[:, i, 1])

    def _step(self, token, index):
        """Greedy next token [batch] after `token` [batch, 1], each row's at its own cache position
        `index` [batch]."""
        backbone = self.lm.backbone
        x = backbone.token_embedding(token)
        # Keys written so far, this position included, per row: [batch, 1, 1, width].
        visible = (tf.range(self.width)[None, :] <= index[:, None])[:, None, None, :]
        at = tf.stack([tf.range(tf.shape(index)[0]), index], axis=1)
        positions = index[:, None]
        for i, layer in enumerate(backbone.transformer_layers):
            attention = layer._self_attention_layer
            residual = x
            h = layer._self_attention_layernorm(x)
            query = attention.rotary_embedding_layer(attention._query_dense(h), positions=positions)
            key = attention.rotary_embedding_layer(attention._key_dense(h), positions=positions)
            self.keys[i].scatter_nd_update(at, key[:, 0])
            self.values[i].scatter_nd_update(at, attention._value_dense(h)[:, 0])
            kv_heads, head_dim = self.keys[i].shape[2], self.keys[i].shape[3]
            groups = query.shape[2] // kv_heads
            grouped = tf.reshape(query, [-1, kv_heads, groups, head_dim])
            scores = tf.einsum("bkgd,bwkd->bkgw", grouped, self.keys[i]) * attention._inv_norm_factor
            scores = tf.where(visible, tf.cast(scores, tf.float32), tf.float32.min)
            weights = tf.cast(tf.nn.softmax(scores, axis=-1), self.values[i].dtype)
            mixed = tf.einsum("bkgw,bwkd->bkgd", weights, self.values[i])
            x = attention._output_dense(tf.reshape(mixed, [-1, 1, kv_heads * groups, head_dim])) + residual
            residual = x
            h = layer._feedforward_layernorm(x)
            gate = tf.cast(layer.activation(tf.cast(layer._feedforward_gate_dense(h), tf.float32)), h.dtype)
            x = layer._feedforward_output_dense(layer._feedforward_intermediate_dense(h) * gate) + residual
        logits = backbone.token_embedding(backbone.layer_norm(x), reverse=True)
        return tf.argmax(logits[:, -1, :], axis=-1, output_type=tf.int32)


def check_prompt_generation(lm) -> None:
    """Generation with prompt vectors replays keras-hub's llama-family cache pass (below)."""
    if not isinstance(lm, keras_hub.models.LlamaCausalLM):
        raise ValueError(f"--method=prompt generates with llama-family decoders (Llama, Llama 3, SmolLM2); "
                         f"{type(lm).__name__} is not one")


def _prefill_with_prompt(lm, prompt, token_ids):
    """keras-hub's LlamaCausalLM._build_cache + call_with_cache(..., 0), with the learned prompt
    vectors inserted after position 0 of the embedded tokens: the cache then holds them as the
    training graph saw them."""
    backbone = lm.backbone
    x = backbone.token_embedding(token_ids)
    batch, width = tf.shape(x)[0], tf.shape(x)[1]
    vectors = tf.broadcast_to(tf.cast(prompt.prompts, x.dtype)[None], [batch, prompt.num_tokens, x.shape[-1]])
    x = tf.concat([x[:, :1], vectors, x[:, 1:]], axis=1)
    head_dim = backbone.hidden_dim // backbone.num_query_heads
    cache = tf.zeros([batch, backbone.num_layers, 2, width + prompt.num_tokens,
                      backbone.num_key_value_heads, head_dim], x.dtype)
    layers = []
    for i, layer in enumerate(backbone.transformer_layers):
        x, layer_cache = layer(x, self_attention_cache=cache[:, i], self_attention_cache_update_index=0)
        layers.append(layer_cache)
    return tf.stack(layers, axis=1)
