"""The encoder–decoder as the training loop sees it, its loss on target tokens, and greedy generation.

The loop's features carry the encoder's ids as token_ids / padding_mask and the decoder's as
decoder_token_ids / decoder_padding_mask (teacher forcing: the decoder reads the target shifted
right behind its prefix). The model returns the decoder's hidden states; the loss projects only the
trained positions through the tied token embedding (reverse=True), as the causal_lm task does.
"""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from kft.tasks.causal_lm import model as lm_model

_INPUTS = {"token_ids": "encoder_token_ids", "padding_mask": "encoder_padding_mask",
           "decoder_token_ids": "decoder_token_ids", "decoder_padding_mask": "decoder_padding_mask"}


def build_model(backbone: keras.Model) -> keras.Model:
    inputs = {name: keras.Input(shape=(None,), dtype="int32", name=name) for name in _INPUTS}
    outputs = backbone({theirs: inputs[ours] for ours, theirs in _INPUTS.items()})
    return keras.Model(inputs, outputs["decoder_sequence_output"], name="seq2seq")


def backbone_of(model: keras.Model) -> keras.Model:
    for layer in model.layers:
        if isinstance(layer, keras_hub.models.Backbone):
            return layer
    raise ValueError(f"{model.name} holds no keras-hub backbone")


def logits_function(backbone: keras.Model):
    """hidden [..., h] -> logits [..., vocabulary] through the tied embedding; T5 scales the hidden
    states by hidden_dim ** -0.5 first when its head is tied (T5Seq2SeqLM._logits), BART does not."""
    embedding = backbone.token_embedding
    if getattr(backbone, "tie_embedding_weights", False):
        scale = float(backbone.hidden_dim) ** -0.5
        return lambda hidden: embedding(hidden * tf.cast(scale, hidden.dtype), reverse=True)
    return lambda hidden: embedding(hidden, reverse=True)


def loss_function(model: keras.Model):
    """The loss on the target tokens, as causal_lm's on completions (`summed_loss`)."""
    return lm_model.summed_loss(logits_function(backbone_of(model)))


def predict_function(model: keras.Model):
    """fn(features, labels) -> [b, 2]: each example's summed target cross-entropy and argmax hits
    (per example, not per position: the loop orders outputs by the encoder's lengths)."""
    logits_fn = logits_function(backbone_of(model))

    def predict(features, labels):
        hidden = model(features, training=False)
        ce, correct, where = lm_model.token_scores(logits_fn, hidden, labels)
        return tf.math.unsorted_segment_sum(tf.stack([ce, correct], axis=-1), where[:, 0], tf.shape(labels)[0])

    return predict


def greedy_argmax(logits, seed):
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def generate(lm, encoder_ids, encoder_mask, prefix: list[int], max_new_tokens: int, stop_ids: list[int],
             pad_id: int, pick=greedy_argmax, seed: int = 0):
    """Generated ids after `prefix` for each row of a right-padded encoder batch (stop token excluded,
    at most `max_new_tokens` tokens counting it) and whether each row stopped: (ragged ids, [b] bool).

    Graph ops only, over keras-hub's Seq2SeqLM cache functions (`call_encoder`, `_initialize_cache`,
    `call_decoder_with_cache`, which BART and T5 share): the evaluation and the export run this same
    loop. keras-hub's own `generate` is not used: for T5 in keras-hub 0.32 it traces only with a fixed
    batch size, and the export serves batches of any size.
    """
    batch = tf.shape(encoder_ids)[0]
    start, width = len(prefix), len(prefix) + max_new_tokens
    hidden = lm.call_encoder(token_ids=encoder_ids, padding_mask=encoder_mask)
    ids = tf.concat([tf.tile(tf.constant([prefix], tf.int32), [batch, 1]),
                     tf.fill([batch, max_new_tokens], tf.constant(pad_id, tf.int32))], axis=1)
    self_cache, cross_cache = lm._initialize_cache(encoder_ids, ids)
    # One pass over the prefix fills the cross-attention cache (and the prefix's keys and values).
    _, _, self_cache, cross_cache = lm.call_decoder_with_cache(
        encoder_hidden_states=hidden, encoder_padding_mask=encoder_mask, decoder_token_ids=ids[:, :start],
        self_attention_cache=self_cache, self_attention_cache_update_index=0,
        cross_attention_cache=cross_cache, cross_attention_cache_update_index=0)
    stop = tf.constant(stop_ids, tf.int32)
    positions = tf.range(width)[None, :]

    def body(t, ids, cache, done, hit, count):
        # Position t-1's token in, position t's token out (t = start rewrites the last prefix
        # position's keys and values with the same values).
        logits, _, cache, _ = lm.call_decoder_with_cache(
            encoder_hidden_states=hidden, encoder_padding_mask=encoder_mask, decoder_token_ids=ids[:, t - 1:t],
            self_attention_cache=cache, self_attention_cache_update_index=t - 1,
            cross_attention_cache=cross_cache, cross_attention_cache_update_index=None)
        token = pick(tf.cast(logits[:, -1, :], tf.float32), tf.stack([seed, t]))
        free = ~done
        is_stop = tf.reduce_any(tf.equal(token[:, None], stop[None, :]), axis=1)
        ids = tf.where(free[:, None] & tf.equal(positions, t), token[:, None], ids)
        count += tf.cast(free & ~is_stop, tf.int32)
        return t + 1, ids, cache, done | (free & is_stop), hit | (free & is_stop), count

    _, ids, _, _, hit, count = tf.while_loop(
        lambda t, ids, cache, done, hit, count: (t < width) & ~tf.reduce_all(done), body,
        [tf.constant(start), ids, self_cache, tf.zeros([batch], tf.bool), tf.zeros([batch], tf.bool),
         tf.zeros([batch], tf.int32)])
    return tf.RaggedTensor.from_tensor(ids[:, start:], lengths=count), hit


class Generator:
    """Greedy generation for the current weights, in length-ordered batches of a fixed row count
    (filler rows repeat the first; a row's output does not depend on the others)."""

    def __init__(self, backbone: keras.Model, seq2seq_lm_class: type, loaded, batch_size: int):
        self.lm = seq2seq_lm_class(backbone=backbone, preprocessor=None)
        self.loaded, self.batch_size = loaded, batch_size
        self._run = {}

    def __call__(self, sources: list[np.ndarray], max_new_tokens: int):
        """Generated ids of each encoder input (stop token excluded) and whether it stopped."""
        if max_new_tokens not in self._run:
            loaded, lm = self.loaded, self.lm
            self._run[max_new_tokens] = tf.function(
                lambda ids, mask: generate(lm, ids, mask, loaded.decoder_prefix, max_new_tokens,
                                           loaded.stop_ids, loaded.pad_id),
                reduce_retracing=True)
        run = self._run[max_new_tokens]
        order = np.argsort([len(s) for s in sources], kind="stable")
        out, stopped = [None] * len(sources), [False] * len(sources)
        for begin in range(0, len(order), self.batch_size):
            rows = order[begin:begin + self.batch_size]
            width = max(len(sources[i]) for i in rows)
            ids = np.full((self.batch_size, width), self.loaded.pad_id, np.int32)
            mask = np.zeros((self.batch_size, width), np.int32)
            for r, i in enumerate(rows):
                ids[r, :len(sources[i])], mask[r, :len(sources[i])] = sources[i], 1
            ids[len(rows):], mask[len(rows):] = ids[0], mask[0]
            generated, hit = run(tf.constant(ids), tf.constant(mask))
            generated, hit = generated.to_list(), hit.numpy()
            for r, i in enumerate(rows):
                out[i], stopped[i] = np.asarray(generated[r], np.int32), bool(hit[r])
        return out, stopped
