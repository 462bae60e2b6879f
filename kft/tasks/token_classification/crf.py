"""A linear-chain conditional random field over per-word tag scores, in Keras 3 ops.

Training minimises the negative log-likelihood of the gold tag path: the log-partition over all
paths (forward algorithm) minus the gold path's score. Decoding is Viterbi. Both run inside a traced
graph (`keras.ops.scan`), so the exported SavedModel decodes without Python. Transitions a tagging
scheme forbids (IOB2: `O -> I-X`, `B-X -> I-Y`, a sentence starting with `I-X`) get a large
negative score at decoding, so the decoder never emits them.

Sequences are left-aligned: `mask[b, t]` is 1 for the first `length[b]` positions and 0 after.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

FORBIDDEN = -1e4  # added to forbidden transitions at decoding; finite, so sums stay finite


def iob2_constraints(tags: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(allowed[from, to], allowed_start[to]) for IOB2 tags such as O, B-PER, I-PER."""
    k = len(tags)
    allowed = np.ones((k, k), bool)
    start = np.ones(k, bool)
    for j, to in enumerate(tags):
        if not to.startswith("I-"):
            continue
        start[j] = False
        for i, frm in enumerate(tags):
            allowed[i, j] = frm[2:] == to[2:] and frm[:2] in ("B-", "I-")
    return allowed, start


class CRF(keras.layers.Layer):
    """Transition scores between tags (plus start and end scores), with NLL and Viterbi."""

    def __init__(self, num_tags: int, allowed: np.ndarray | None = None,
                 allowed_start: np.ndarray | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_tags = num_tags
        self.transitions = self.add_weight(name="transitions", shape=(num_tags, num_tags),
                                           initializer="zeros")
        self.start = self.add_weight(name="start", shape=(num_tags,), initializer="zeros")
        self.end = self.add_weight(name="end", shape=(num_tags,), initializer="zeros")
        allowed = np.ones((num_tags, num_tags), bool) if allowed is None else np.asarray(allowed, bool)
        allowed_start = np.ones(num_tags, bool) if allowed_start is None else np.asarray(allowed_start, bool)
        self.penalty = np.where(allowed, 0.0, FORBIDDEN).astype("float32")
        self.start_penalty = np.where(allowed_start, 0.0, FORBIDDEN).astype("float32")
        self.built = True

    def call(self, emissions):
        """Passes the tag scores through: in a model graph the layer only owns the transition
        weights (so they train, checkpoint and export with the model); the loss calls
        `negative_log_likelihood` and prediction calls `decode`."""
        return ops.cast(emissions, "float32")

    def _steps(self, emissions, mask):
        """Time-major emissions [time, batch, tags] and mask [time, batch, 1] (float), and both
        in one tensor [time, batch, tags + 1] to scan over (Keras' TF scan needs a single input
        when the time length is only known at run time)."""
        e = ops.transpose(ops.cast(emissions, "float32"), (1, 0, 2))
        m = ops.transpose(ops.cast(mask, "float32"), (1, 0))[..., None]
        # One extra masked step at the end: the scans never run over zero steps (a one-word batch),
        # which a graph with an unknown batch size cannot stack. Masked steps change nothing.
        e = ops.concatenate([e, ops.zeros_like(e[:1])], axis=0)
        m = ops.concatenate([m, ops.zeros_like(m[:1])], axis=0)
        return e, m, ops.concatenate([e, m], axis=-1)

    def log_partition(self, emissions, mask):
        """log sum over all tag paths of exp(score) [batch]: the forward algorithm."""
        e, _, both = self._steps(emissions, mask)
        trans = ops.convert_to_tensor(self.transitions)[None]  # [1, from, to]

        def step(alpha, inputs):
            e_t, m_t = inputs[:, :-1], inputs[:, -1:]
            nxt = ops.logsumexp(alpha[:, :, None] + trans, axis=1) + e_t
            alpha = m_t * nxt + (1.0 - m_t) * alpha  # past the end: carry the last value
            return alpha, alpha

        alpha0 = self.start[None] + e[0]
        alpha, _ = ops.scan(step, alpha0, both[1:])
        return ops.logsumexp(alpha + self.end[None], axis=1)

    def path_score(self, emissions, tags, mask):
        """Score of the given tag path [batch]: start + emissions + transitions + end."""
        emissions = ops.cast(emissions, "float32")
        mask = ops.cast(mask, "float32")
        tags = ops.cast(tags, "int32")
        one_hot = ops.one_hot(tags, self.num_tags)
        emitted = ops.sum(ops.sum(emissions * one_hot, axis=-1) * mask, axis=1)
        pairs = ops.take(ops.reshape(self.transitions, (-1,)), tags[:, :-1] * self.num_tags + tags[:, 1:])
        moved = ops.sum(pairs * mask[:, 1:], axis=1)
        lengths = ops.cast(ops.sum(mask, axis=1), "int32")
        last = ops.take_along_axis(tags, ops.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
        return ops.take(self.start, tags[:, 0]) + emitted + moved + ops.take(self.end, last)

    def negative_log_likelihood(self, emissions, tags, mask):
        """-log p(tags | emissions) per sequence [batch]."""
        return self.log_partition(emissions, mask) - self.path_score(emissions, tags, mask)

    def decode(self, emissions, mask):
        """(best tags [batch, time] int32, their score [batch]) under the transition constraints."""
        e, _, both = self._steps(emissions, mask)
        trans = (ops.convert_to_tensor(self.transitions) + self.penalty)[None]
        score0 = self.start[None] + self.start_penalty[None] + e[0]

        def forward(score, inputs):
            e_t, m_t = inputs[:, :-1], inputs[:, -1:]
            candidates = score[:, :, None] + trans  # [batch, from, to]
            best_from = ops.cast(ops.argmax(candidates, axis=1), "int32")
            nxt = ops.max(candidates, axis=1) + e_t
            score = m_t * nxt + (1.0 - m_t) * score
            # past the end a position points to the same tag, so backtracking passes through
            same = ops.broadcast_to(ops.arange(self.num_tags, dtype="int32")[None], ops.shape(best_from))
            keep = ops.cast(m_t, "int32")
            # (as float: the TF backend's scan stacks outputs in the inputs' dtype)
            return score, ops.cast(keep * best_from + (1 - keep) * same, "float32")

        score, pointers = ops.scan(forward, score0, both[1:])  # pointers [time-1, batch, tags]
        pointers = ops.cast(pointers, "int32")
        score = score + self.end[None]
        last = ops.cast(ops.argmax(score, axis=1), "int32")

        def backward(tag, pointer):
            prev = ops.take_along_axis(pointer, tag[:, None], axis=1)[:, 0]
            return prev, prev

        _, earlier = ops.scan(backward, last, pointers, reverse=True)  # earlier[t] = tag at t
        tags = ops.concatenate([earlier, last[None]], axis=0)[:-1]  # drop the extra step
        tags = ops.transpose(tags, (1, 0)) * ops.cast(mask, "int32")
        return tags, ops.max(score, axis=1)
