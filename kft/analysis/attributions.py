"""Integrated gradients (Sundararajan et al., 2017) over a fine-tuned model's token embeddings.

Each content token's embedding e_p moves along a straight line from the padding token's embedding b
(the baseline; the special tokens, positions and attention mask stay as they are) to e_p:
x_p(a) = b + a (e_p - b). With a scale s_p in place of a at every content position,
df/ds_p = grad_{x_p} f . (e_p - b), so the attribution of token p is the integral over a in [0, 1] of
df/ds_p, computed by the trapezoid rule over --ig_steps intervals, all steps of one text in one
batch (a decoder's in as few batches as its activations allow). Completeness: the attributions
sum to f(input) - f(baseline); kft reports the gap per text, and where it is above 1% halves the
intervals (up to --ig_max_steps), since a fixed number of steps that suits most texts leaves a few
whose path bends sharply (a saturating probability, a long decoder prompt) above the gap.

f is the probability the model gives the target class (classification), the target tag at a
word's first word piece (token classification), or the log-probability of a completion given the
prompt (decoders; kft/tasks/causal_lm/explain.py). A word's attribution is the sum over its pieces.
A decoder's output projection is its token embedding used in reverse; that call is not scaled.
No well-kept Keras 3 library does this for text models, hence these few dozen lines.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import numpy as np
import tensorflow as tf

# A text whose attributions miss f(input) - f(baseline) by more than this (relative) is refined
# with more steps (up to --ig_max_steps) and, if still above, warned about.
COMPLETENESS_TOLERANCE = 0.01


@dataclasses.dataclass
class Attribution:
    """One text's (or one tagged word's) attributions per token, with the completeness check."""

    tokens: np.ndarray  # [length] per-position attributions (0 at special tokens)
    output: float  # f(input)
    baseline_output: float  # f(baseline)
    steps: int

    @property
    def total(self) -> float:
        return float(self.tokens.sum())

    @property
    def completeness_error(self) -> float:
        """|sum of attributions - (f(x) - f(b))| relative to |f(x) - f(b)| (absolute below 1e-3)."""
        delta = self.output - self.baseline_output
        return abs(self.total - delta) / max(abs(delta), 1e-3)


def token_embedding_layer(backbone: keras.Model) -> keras.layers.Layer:
    layer = getattr(backbone, "token_embedding", None)
    if layer is None:
        raise ValueError(f"{type(backbone).__name__} has no token_embedding layer to attribute through")
    return layer


@contextlib.contextmanager
def scaled_token_embeddings(backbone: keras.Model | None, state: dict, layer: keras.layers.Layer | None = None):
    """While active, the backbone's token embeddings (or `layer`'s) are b + s (e - b) with
    b = state["baseline"] ([hidden]) and s = state["scale"] ([rows, length, 1]); without a scale they
    are unchanged."""
    layer = layer if layer is not None else token_embedding_layer(backbone)
    original = layer.call

    def call(inputs, *args, **kwargs):
        embedded = original(inputs, *args, **kwargs)
        if state.get("scale") is None or kwargs.get("reverse") or (args and args[0] is True):
            return embedded  # a decoder's tied output projection passes through
        baseline = tf.cast(state["baseline"], embedded.dtype)
        return baseline + tf.cast(state["scale"], embedded.dtype) * (embedded - baseline)

    layer.call = call  # an instance attribute: the functional graph calls layer.call through __call__
    try:
        yield
    finally:
        del layer.call


def find_backbone(model: keras.Model) -> keras.Model:
    for layer in model.layers:
        if hasattr(layer, "token_embedding"):
            return layer
    raise ValueError("the model has no keras-hub backbone with a token_embedding layer")


def integrated_gradients(model: keras.Model, token_ids: np.ndarray, padding_mask: np.ndarray,
                         content: np.ndarray, target, pad_id: int, steps: int,
                         rows_per_batch: int = 64, embedding: keras.layers.Layer | None = None,
                         max_steps: int | None = None,
                         tolerance: float = COMPLETENESS_TOLERANCE) -> Attribution:
    """Attributions of one sequence's tokens to `target(outputs) -> [rows]` (e.g. a class's probability).

    token_ids, padding_mask, content: [length]; `content` marks the positions that are interpolated
    (the text's word pieces; not the special tokens). `embedding`: the token embedding layer, where
    the backbone is not a layer of `model` (a decoder's graph rebuilt by prompt tuning).
    Refinement: while the completeness gap is above `tolerance` and 2 x steps <= `max_steps`, the
    intervals are halved; only the new midpoints are computed (the earlier points are reused).
    The result's `steps` is the number of intervals used.
    """
    backbone = find_backbone(model) if embedding is None else None
    layer = embedding if embedding is not None else token_embedding_layer(backbone)
    baseline = layer(tf.constant([[pad_id]], tf.int32))[0, 0]
    state = {"baseline": baseline}

    def evaluate(alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(d f / d scale [len(alphas), length], f [len(alphas)]) with every content position at alpha."""
        grads, values = [], []
        for start in range(0, len(alphas), rows_per_batch):
            a = alphas[start:start + rows_per_batch]
            rows = len(a)
            scale = tf.constant(np.where(content[None, :], a[:, None], 1.0).astype(np.float32)[:, :, None])
            features = {"token_ids": tf.constant(np.tile(token_ids[None, :], (rows, 1)), tf.int32),
                        "padding_mask": tf.constant(np.tile(padding_mask[None, :], (rows, 1)), tf.int32)}
            with tf.GradientTape() as tape:
                tape.watch(scale)
                state["scale"] = scale
                outputs = model(features, training=False)
                f = tf.cast(target(outputs), tf.float32)
                total = tf.reduce_sum(f)  # rows are independent: d total / d scale[row] = d f[row] / d scale[row]
            grads.append(tape.gradient(total, scale).numpy()[:, :, 0])
            values.append(f.numpy())
        return np.concatenate(grads), np.concatenate(values)

    def integrate(grads: np.ndarray, values: np.ndarray, n: int) -> Attribution:
        weights = np.full(n + 1, 1.0 / n, np.float64)
        weights[[0, -1]] *= 0.5  # trapezoid rule
        tokens = np.where(content, (weights[:, None] * grads).sum(0), 0.0).astype(np.float64)
        assert tokens.shape == (len(token_ids),)
        return Attribution(tokens, float(values[-1]), float(values[0]), n)

    max_steps = steps if max_steps is None else max_steps
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    with scaled_token_embeddings(backbone, state, layer):
        grads, values = evaluate(alphas)
        result = integrate(grads, values, steps)
        while result.completeness_error > tolerance and 2 * steps <= max_steps:
            middle = (alphas[:-1] + alphas[1:]) / 2
            middle_grads, middle_values = evaluate(middle)
            alphas = np.stack([alphas[:-1], middle], 1).reshape(-1)
            alphas = np.append(alphas, np.float32(1.0))
            grads = _interleave(grads, middle_grads)
            values = _interleave(values, middle_values)
            steps *= 2
            result = integrate(grads, values, steps)
        state["scale"] = None
    return result


def _interleave(points: np.ndarray, middles: np.ndarray) -> np.ndarray:
    """[n + 1, ...] and [n, ...] -> [2n + 1, ...]: points[0], middles[0], points[1], ..., points[n]."""
    out = np.empty((len(points) + len(middles),) + points.shape[1:], points.dtype)
    out[0::2], out[1::2] = points, middles
    return out


def word_attributions(attribution: Attribution, piece_word: np.ndarray, n_words: int) -> np.ndarray:
    """Sums each word's pieces: piece_word[p] = word index of position p, or -1 (special/cut)."""
    out = np.zeros(n_words)
    keep = piece_word >= 0
    np.add.at(out, piece_word[keep], attribution.tokens[keep])
    return out


@dataclasses.dataclass
class Words:
    """A text split at whitespace, its word pieces packed for the model, and the piece -> word map."""

    words: list[str]
    starts: list[int]  # character offsets of each word
    ends: list[int]
    token_ids: np.ndarray  # [length] packed: start tokens, pieces, end tokens
    piece_word: np.ndarray  # [length] word index of each position, -1 for special tokens
    first_piece: np.ndarray  # [words] position of each word's first piece, -1 if cut
    cut_pieces: int  # pieces that did not fit in the sequence length


def split_words(text: str, tokenizer, packing, sequence_length: int, unknown_id: int | None = None) -> Words:
    """`unknown_id`: a word the tokenizer drops entirely reads as this id (as token-classification
    serving does), so that it keeps a position; without it the word gets no attribution."""
    import re

    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    words = [text[a:b] for a, b in spans]
    pieces = [list(np.asarray(p).reshape(-1)) for p in tokenizer(words)] if words else []
    if unknown_id is not None:
        pieces = [p or [unknown_id] for p in pieces]
    room = sequence_length - len(packing.start) - len(packing.end)
    ids, owner, first = list(packing.start), [-1] * len(packing.start), []
    kept = 0
    for w, word_pieces in enumerate(pieces):
        if kept + len(word_pieces) > room:
            break  # this word and the rest do not fit: counted in cut_pieces
        first.append(len(ids) if word_pieces else -1)
        ids += [int(p) for p in word_pieces]
        owner += [w] * len(word_pieces)
        kept += len(word_pieces)
    first += [-1] * (len(words) - len(first))
    ids += list(packing.end)
    owner += [-1] * len(packing.end)
    cut = sum(len(p) for p in pieces) - kept
    return Words(words, [a for a, _ in spans], [b for _, b in spans], np.asarray(ids, np.int32),
                 np.asarray(owner, np.int32), np.asarray(first, np.int32), cut)
