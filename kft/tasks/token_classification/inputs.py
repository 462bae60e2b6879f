"""Words to word pieces and back, for token classification.

Every word is tokenized once (all words of a split in one call). A word's first piece carries its
tag; its other pieces and the special tokens carry -1, which the loss and the metrics skip. A
sentence with more pieces than `sequence_length` allows is cut into overlapping windows of whole
words (consecutive windows share at most `stride` pieces), so every word is seen; each word's
prediction is read from the window where it has the most context on its shorter side.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kft.models.backbones import Packing
from kft.data.inputs import word_pieces
from kft.data.split_inputs import IGNORE, row_lengths


@dataclasses.dataclass
class Windows:
    """Packed windows of one split, and where each word's prediction is read."""

    ids: list[np.ndarray]  # per window: token ids with start/end tokens
    labels: list[np.ndarray]  # per window position: tag id at a word's first piece, else IGNORE
    sentence: np.ndarray  # [windows] the sentence each window comes from
    picks: list[np.ndarray]  # per sentence: [words, 2] = (window, position) read for each word
    split_sentences: int  # sentences cut into more than one window
    cut_words: int  # words whose own pieces exceed a window (their extra pieces are dropped)
    empty_words: int  # words the tokenizer turned into no piece (given the unknown token)

    @property
    def lengths(self) -> np.ndarray:
        return row_lengths(self.ids)


def _unknown_id(tokenizer) -> int:
    token = getattr(tokenizer, "oov_token", None) or getattr(tokenizer, "unk_token", None) or "[UNK]"
    return int(tokenizer.token_to_id(token))


def sentence_pieces(tokenizer, words: list[list[str]]) -> tuple[list[list[np.ndarray]], int]:
    """Piece ids of every word of every sentence (one tokenizer call for all words); and how many
    words produced no piece and were given the unknown token."""
    flat = [w for sentence in words for w in sentence]
    ragged = word_pieces(tokenizer, flat)
    values, splits = ragged.flat_values.numpy(), ragged.row_splits.numpy()
    unknown = None
    out, k, empty = [], 0, 0
    for sentence in words:
        pieces = []
        for _ in sentence:
            p = values[splits[k]:splits[k + 1]]
            if not len(p):
                unknown = _unknown_id(tokenizer) if unknown is None else unknown
                p = np.array([unknown], np.int32)
                empty += 1
            pieces.append(p.astype(np.int32))
            k += 1
        out.append(pieces)
    return out, empty


def word_windows(counts: list[int], room: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) word ranges of at most `room` pieces (a lone longer word is a window of its
    own), consecutive ranges overlapping by at most `stride` pieces; they cover every word."""
    n = len(counts)
    spans, start = [], 0
    while True:
        end, used = start, 0
        while end < n and (used + counts[end] <= room or end == start):
            used += counts[end]
            end += 1
        spans.append((start, end))
        if end >= n:
            return spans
        nxt, overlap = end, 0
        while nxt - 1 > start and overlap + counts[nxt - 1] <= stride:
            nxt -= 1
            overlap += counts[nxt]
        start = nxt


def encode(pieces: list[list[np.ndarray]], tags: list[list[int]] | None, packing: Packing,
           sequence_length: int, stride: int, empty_words: int = 0) -> Windows:
    """Packs sentences (piece ids per word) into windows; `tags` None for unlabelled text."""
    start_ids = np.array(packing.start, np.int32)
    end_ids = np.array(packing.end, np.int32)
    room = sequence_length - len(start_ids) - len(end_ids)
    if room < 1:
        raise ValueError(f"sequence_length={sequence_length} leaves no room for word pieces")
    ids, labels, owners, picks = [], [], [], []
    split_sentences = cut_words = 0
    for s, words in enumerate(pieces):
        counts = [len(p) for p in words]
        spans = word_windows(counts, room, min(stride, room - 1))
        split_sentences += len(spans) > 1
        cut_words += sum(c > room for c in counts)
        best = np.full((len(words), 3), -1, np.int64)  # window, position, context
        for a, b in spans:
            window = len(ids)
            parts, marks = [start_ids], [np.full(len(start_ids), IGNORE, np.int32)]
            position = len(start_ids)
            used = sum(counts[a:b])
            before = 0
            for w in range(a, b):
                p = words[w][:room]
                mark = np.full(len(p), IGNORE, np.int32)
                mark[0] = tags[s][w] if tags is not None else 0
                parts.append(p)
                marks.append(mark)
                context = min(before, used - before - counts[w])
                if context > best[w, 2]:
                    best[w] = (window, position, context)
                before += counts[w]
                position += len(p)
            parts.append(end_ids)
            marks.append(np.full(len(end_ids), IGNORE, np.int32))
            ids.append(np.concatenate(parts))
            labels.append(np.concatenate(marks))
            owners.append(s)
        picks.append(best[:, :2].copy())
    return Windows(ids, labels, np.array(owners, np.int64), picks, split_sentences, cut_words,
                   empty_words)


def word_predictions(windows: Windows, per_position: list[np.ndarray]) -> list[np.ndarray]:
    """Per sentence, the value (tag id, score row, ...) each word reads from its chosen window."""
    return [np.stack([per_position[w][p] for w, p in sentence]) if len(sentence) else
            np.zeros((0,), np.int64) for sentence in windows.picks]
