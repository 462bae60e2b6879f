"""Questions and contexts to model windows, and windows' start/end logits back to character spans.

One implementation, in TensorFlow ops, serves training (called eagerly on the whole split) and the
export (inside the serving graph), so the windows a served question gets are the windows it would
get in training.

- A context is cut into units: runs of letters and digits, and single punctuation or symbol
  characters (whitespace separates units and belongs to none). Each unit is tokenized on its own,
  so every word piece belongs to one unit. A piece's character span is exact when the unit's pieces
  spell it out (the pieces' lengths, "##" removed, add up to the unit's length: the usual case);
  otherwise (an [UNK], accents removed by the tokenizer) every piece of the unit spans the whole unit.
- A window is `[start] question [end] context-slice [end]` (BERT's pair packing) of at most
  `sequence_length` positions. The question keeps its first `max_query_length` pieces. Consecutive
  windows of one context share `doc_stride` pieces, as in the Hugging Face `run_qa` recipe, so every
  context piece is in some window and every answer of up to doc_stride + 1 pieces is whole in at
  least one (longer ones may be; `answers_in_no_window` counts those that are not).
- Decoding: the `n_best` highest start and end logits inside a window's context, pairs with
  end >= start and at most `max_answer_length` pieces, scored by start + end logit; a question's
  answer is its best pair over all its windows. The null answer (SQuAD 2.0) scores the start
  token's start + end logits; a question's null score is its lowest over its windows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from kft.data import inputs
from kft.models.backbones import Packing

# Units: split at whitespace (dropped) and at punctuation and symbols (kept, one character each).
UNIT_DELIMITERS = r"\s+|\pP|\pS"
UNIT_KEPT = r"\pP|\pS"


def piece_lengths(vocabulary: list[str]) -> np.ndarray:
    """Characters each vocabulary entry spells in the text: WordPiece's "##" and SentencePiece's
    "▁" markers do not count; special tokens get -1 so that they never match a unit."""
    out = np.zeros(len(vocabulary), np.int32)
    for i, token in enumerate(vocabulary):
        if token.startswith("[") and token.endswith("]") or token.startswith("<") and token.endswith(">"):
            out[i] = -1
        else:
            out[i] = len(token[2:] if token.startswith("##") else token.lstrip("\u2581"))
    return out


def context_pieces(tokenize, texts: tf.Tensor, lengths: tf.Tensor, unknown_id: int):
    """Word pieces of each text with their character spans.

    `tokenize`: [n] strings -> ragged [n, (pieces)] ids; `lengths`: characters per vocabulary id
    (`piece_lengths`). Returns ragged [texts, (pieces)] ids, character starts and ends (int32).
    """
    import tensorflow_text as tf_text

    units, byte_start, byte_end = tf_text.regex_split_with_offsets(texts, UNIT_DELIMITERS, UNIT_KEPT)
    char_start, char_end = inputs.char_offsets(texts, byte_start, byte_end)
    pieces = tf.cast(tokenize(units.flat_values), tf.int32)
    pieces = tf.RaggedTensor.from_row_splits(pieces.flat_values, pieces.row_splits)
    empty = tf.cast(tf.equal(pieces.row_lengths(), 0), tf.int64)  # a unit without pieces reads [UNK]
    unknown = tf.RaggedTensor.from_row_lengths(tf.fill([tf.reduce_sum(empty)], unknown_id), empty)
    pieces = tf.concat([pieces, unknown], axis=1)
    spelled = pieces.with_flat_values(tf.gather(lengths, pieces.flat_values))
    unit_start = tf.cast(char_start.flat_values, tf.int32)
    unit_end = tf.cast(char_end.flat_values, tf.int32)
    exact = tf.equal(tf.reduce_sum(spelled, axis=1), unit_end - unit_start) & \
        tf.reduce_all(spelled > 0, axis=1)
    inside = tf.cumsum(spelled, axis=1, exclusive=True)
    per_piece = tf.gather(exact, pieces.value_rowids())
    base = tf.gather(unit_start, pieces.value_rowids())
    start = tf.where(per_piece, base + inside.flat_values, base)
    end = tf.where(per_piece, base + inside.flat_values + spelled.flat_values,
                   tf.gather(unit_end, pieces.value_rowids()))

    def by_text(values):
        return tf.RaggedTensor.from_row_splits(pieces.with_flat_values(values), units.row_splits).merge_dims(1, 2)

    return by_text(pieces.flat_values), by_text(start), by_text(end)


@dataclasses.dataclass
class Windows:
    """Windows of a batch of questions (tensors; `.numpy()` of each for the Python side)."""

    ids: tf.RaggedTensor  # [windows, (positions)] packed token ids
    example: tf.Tensor  # [windows] the question each window belongs to
    first_piece: tf.Tensor  # [windows] index in the context's pieces of the window's first context piece
    offset: tf.Tensor  # [windows] position in the window where the context starts
    context_length: tf.Tensor  # [windows] context pieces in the window
    question_cut: tf.Tensor  # [questions] question pieces dropped (beyond max_query_length)


def windows(question: tf.RaggedTensor, context: tf.RaggedTensor, packing: Packing, sequence_length: int,
            max_query_length: int, doc_stride: int) -> Windows:
    """Packs each (question pieces, context pieces) pair into overlapping windows."""
    start, end = list(packing.start), list(packing.end)
    question_cut = tf.cast(tf.maximum(question.row_lengths() - max_query_length, 0), tf.int32)
    question = question[:, :max_query_length]
    q_len = tf.cast(question.row_lengths(), tf.int32)
    c_len = tf.cast(context.row_lengths(), tf.int32)
    room = sequence_length - len(start) - 2 * len(end) - q_len  # context pieces per window
    step = room - doc_stride  # > 0: config.check_windows refuses flags that leave no step
    count = 1 + tf.maximum(0, (c_len - room + step - 1) // step)
    example = tf.repeat(tf.range(tf.shape(q_len)[0]), count)
    k = tf.cast(tf.ragged.range(count).flat_values, tf.int32)
    first = k * tf.gather(step, example)
    length = tf.maximum(0, tf.minimum(tf.gather(room, example), tf.gather(c_len, example) - first))
    where = tf.ragged.range(length) + first[:, None] + tf.gather(
        tf.cast(context.row_splits[:-1], tf.int32), example)[:, None]
    context_ids = tf.gather(context.flat_values, where)
    question_ids = tf.gather(question, example)
    n = tf.shape(example)[0]

    def constant(ids):
        return tf.RaggedTensor.from_tensor(tf.tile(tf.constant([ids], tf.int32), [n, 1]))

    parts = ([constant(start)] if start else []) + [question_ids] + \
        ([constant(end)] if end else []) + [context_ids] + ([constant(end)] if end else [])
    ids = tf.concat(parts, axis=1)
    offset = len(start) + tf.gather(q_len, example) + len(end)
    return Windows(ids, example, first, offset, length, question_cut)


def check_windows(sequence_length: int, max_query_length: int, doc_stride: int, packing: Packing) -> str | None:
    """Why these flags leave a window no room to advance, or None."""
    room = sequence_length - len(packing.start) - 2 * len(packing.end) - max_query_length
    if room - doc_stride <= 0:
        return (f"--sequence_length={sequence_length} leaves {room} context pieces per window after a question "
                f"of --max_query_length={max_query_length}; --doc_stride={doc_stride} must be smaller than that")
    return None


def answer_span(char_start: np.ndarray, char_end: np.ndarray, answer_start: int, answer_end: int):
    """Context piece indices (first, last) covering characters [answer_start, answer_end), or None;
    and whether the pieces' characters are exactly the answer's."""
    first = np.flatnonzero(char_end > answer_start)
    last = np.flatnonzero(char_start < answer_end)
    if not len(first) or not len(last) or last[-1] < first[0]:
        return None, False
    s, e = int(first[0]), int(last[-1])
    return (s, e), bool(char_start[s] == answer_start and char_end[e] == answer_end)


def window_labels(span, first_piece: int, offset: int, context_length: int) -> tuple[int, int]:
    """(start, end) positions of the answer in one window, or (0, 0) (the start token) when the
    window does not hold the whole answer or there is none."""
    if span is None:
        return 0, 0
    s, e = span
    if s >= first_piece and e < first_piece + context_length:
        return offset + s - first_piece, offset + e - first_piece
    return 0, 0


# -- decoding ---------------------------------------------------------------------------------------

def best_spans(logits: np.ndarray, offset: np.ndarray, context_length: np.ndarray, n_best: int,
               max_answer_length: int):
    """Best span per window: (score [w], start [w], end [w] positions in the window; score -inf
    when no pair qualifies), and the null score per window. `logits`: [w, positions, 2]."""
    w, t = logits.shape[0], logits.shape[1]
    position = np.arange(t)[None, :]
    context = (position >= offset[:, None]) & (position < (offset + context_length)[:, None])
    start = np.where(context, logits[:, :, 0], -np.inf)
    end = np.where(context, logits[:, :, 1], -np.inf)
    k = min(n_best, t)
    # top-k with ties to the lower index, as tf.math.top_k orders them
    s_idx = np.argsort(-start, axis=1, kind="stable")[:, :k]
    e_idx = np.argsort(-end, axis=1, kind="stable")[:, :k]
    s_val = np.take_along_axis(start, s_idx, 1)
    e_val = np.take_along_axis(end, e_idx, 1)
    length = e_idx[:, None, :] - s_idx[:, :, None] + 1
    ok = (length >= 1) & (length <= max_answer_length) & np.isfinite(s_val)[:, :, None] & \
        np.isfinite(e_val)[:, None, :]
    score = np.where(ok, s_val[:, :, None] + e_val[:, None, :], -np.inf).reshape(w, k * k)
    best = score.argmax(axis=1)
    rows = np.arange(w)
    null = logits[:, 0, 0] + logits[:, 0, 1]
    return score[rows, best], s_idx[rows, best // k], e_idx[rows, best % k], null


def graph_best_spans(logits: tf.Tensor, offset: tf.Tensor, context_length: tf.Tensor, n_best: int,
                     max_answer_length: int):
    """`best_spans` in TensorFlow ops (the serving graph), with the same tie-breaking."""
    t = tf.shape(logits)[1]
    position = tf.range(t)[None, :]
    context = (position >= offset[:, None]) & (position < (offset + context_length)[:, None])
    neg = tf.constant(-np.inf, logits.dtype)
    start = tf.where(context, logits[:, :, 0], neg)
    end = tf.where(context, logits[:, :, 1], neg)
    k = tf.minimum(n_best, t)
    s_val, s_idx = tf.math.top_k(start, k)
    e_val, e_idx = tf.math.top_k(end, k)
    length = e_idx[:, None, :] - s_idx[:, :, None] + 1
    finite_s = tf.math.is_finite(s_val)[:, :, None]
    finite_e = tf.math.is_finite(e_val)[:, None, :]
    ok = (length >= 1) & (length <= max_answer_length) & finite_s & finite_e
    score = tf.where(ok, s_val[:, :, None] + e_val[:, None, :], neg)
    score = tf.reshape(score, [tf.shape(logits)[0], k * k])
    best = tf.argmax(score, axis=1, output_type=tf.int32)
    best_score = tf.gather(score, best, batch_dims=1)
    best_start = tf.gather(s_idx, best // k, batch_dims=1)
    best_end = tf.gather(e_idx, best % k, batch_dims=1)
    return best_score, best_start, best_end, logits[:, 0, 0] + logits[:, 0, 1]
