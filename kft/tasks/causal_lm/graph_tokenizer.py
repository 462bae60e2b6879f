"""Byte-level BPE tokenization as TensorFlow graph ops, for the generating SavedModel.

keras-hub 0.32's `BytePairTokenizer` tokenizes with the `tokenizers` library when called eagerly
(what kft trains on) and with a separate TensorFlow path inside a graph, which gives other ids:
  - the eager path never splits a text into words before the merges: its pre-tokenizer is
    `Split(pattern=<the Llama 3 regex as a str>)`, and `tokenizers` reads a str pattern as a literal
    string, so each text between special tokens is merged as one word; the graph path splits words
    with GPT-2's pattern first (runs of spaces, `'s` after punctuation and the like come out
    differently: 128 of 1,192 DialogSum and support texts, 0.1% of their tokens);
  - the graph path does not keep special tokens such as `<|im_start|>` whole (a chat prompt loses
    its roles);
  - it memoises merged words in a mutable hash table whose lookups are not ordered after the inserts
    of the same call, so one text's ids changed from process to process.
This module is the eager path's tokenization in graph ops: special tokens split out first, the byte
to unicode map, and the merge loop over static tables. `check` compares it with the eager tokenizer
on given texts; the export refuses to write a model whose served ids would differ.

Merging a whole text as one word takes as many rounds as the text has distinct merges (hundreds
for a 200-token prompt). The text is therefore cut where the merge table shows no merge can
cross: before a run of spaces, unless the byte before it ends the left side of some merge whose
right side starts with a space (in SmolLM2's table, only newlines do). The pieces merge
independently, in parallel, to the same ids.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet byte-level BPE
    vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _table(keys, values, default):
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys), tf.constant(values)), default_value=default)


class GraphBPE(tf.Module):
    """tokenize(texts [n] string) -> ragged int32 ids; detokenize(ragged ids) -> [n] string."""

    def __init__(self, vocabulary: dict[str, int], merges: list[str], special_tokens: list[str]):
        super().__init__(name="graph_bpe")
        tokens = list(vocabulary)
        ids = np.asarray([vocabulary[t] for t in tokens], np.int64)
        self.token_to_id = _table(tokens, ids, -1)
        self.id_to_token = _table(ids, tokens, "")
        merges = [m for m in merges if not m.lstrip().startswith("#version")]
        self.no_merge = len(merges) + 1
        self.merge_rank = _table(list(merges), np.arange(len(merges), dtype=np.int64), self.no_merge)
        mapping = bytes_to_unicode()
        self.byte_to_char = _table([bytes([b]) for b in range(256)], [mapping[b] for b in range(256)], "")
        self.char_to_byte = _table([mapping[b] for b in range(256)], [bytes([b]) for b in range(256)], "")
        # Bytes after which a space may still merge (the left side of a merge ends with them and its
        # right side starts with a space): no cut there.
        space = mapping[ord(" ")]
        inverse = {c: b for b, c in mapping.items()}
        self.joiners = bytes(sorted({inverse[m.split(" ")[0][-1]] for m in merges
                               if len(m.split(" ")) == 2 and m.split(" ")[1].startswith(space)
                               and m.split(" ")[0] and m.split(" ")[0][-1] != space
                               and m.split(" ")[0][-1] in inverse}))  # bytes: not tracked by tf.Module
        specials = sorted({s for s in special_tokens if s}, key=len, reverse=True)  # longest first
        self.special_pattern = "|".join(_escape(s) for s in specials)
        self.special_id = _table(specials or [""], np.asarray([vocabulary.get(s, -1) for s in specials] or [-1],
                                                                 np.int64), -1)

    def _merge(self, symbols: tf.RaggedTensor) -> tf.RaggedTensor:
        """Applies the merges until none applies: each round merges, in every word, every occurrence
        of the word's lowest-ranked pair (overlapping ones left to right, as `a a a` -> `aa a`).

        This is BPE's one-pair-at-a-time loop in fewer rounds: a merge of rank r only creates
        symbols that take part in merges of higher rank, so the other occurrences of r can go in
        the same round.
        """
        no_merge = tf.constant(self.no_merge, tf.int64)

        def round_(words, _):
            dense = words.to_tensor("")
            rows = tf.shape(dense)[0]
            following = tf.concat([dense[:, 1:], tf.fill([rows, 1], "")], axis=1)
            ranks = self.merge_rank.lookup(tf.strings.join([dense, following], separator=" "))
            ranks = tf.where((dense != "") & (following != ""), ranks, no_merge)
            best = tf.reduce_min(tf.concat([ranks, tf.fill([rows, 1], no_merge)], axis=1), axis=1)
            candidate = (ranks == best[:, None]) & (best < no_merge)[:, None]
            # Overlapping occurrences (`a a a` for the pair `a a`) are runs of candidates: only a run's
            # first merges now, the rest in later rounds, which gives BPE's left-to-right result.
            left = candidate & ~tf.concat([tf.zeros([rows, 1], tf.bool), candidate[:, :-1]], axis=1)
            right = tf.concat([tf.zeros([rows, 1], tf.bool), left[:, :-1]], axis=1)
            merged = tf.where(left, tf.strings.join([dense, following]), dense)
            return tf.ragged.boolean_mask(merged, (merged != "") & ~right), tf.reduce_any(candidate)

        words, _ = tf.while_loop(lambda w, go: go, round_, [symbols, tf.constant(True)],
                                 shape_invariants=[tf.RaggedTensorSpec([None, None], tf.string, 1, tf.int64),
                                                   tf.TensorShape([])])
        return words

    def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        import tensorflow_text as tf_text

        texts = tf.convert_to_tensor(texts, tf.string)
        if self.special_pattern:
            pieces = tf_text.regex_split(texts, self.special_pattern, self.special_pattern)
        else:
            pieces = tf.RaggedTensor.from_tensor(texts[:, None])
        flat = pieces.flat_values
        special = self.special_id.lookup(flat) >= 0
        # Special pieces get no words: their id comes from the special table, not from merges.
        words = self._words(tf.where(special, "", flat))
        symbols = self.byte_to_char.lookup(tf.strings.bytes_split(words.flat_values))
        word_ids = self.token_to_id.lookup(self._merge(symbols))
        word_ids = tf.ragged.boolean_mask(word_ids, word_ids.with_flat_values(word_ids.flat_values >= 0))
        bpe_ids = tf.RaggedTensor.from_row_splits(word_ids, words.row_splits).merge_dims(1, 2)
        special_ids = tf.RaggedTensor.from_row_lengths(
            tf.boolean_mask(self.special_id.lookup(flat), special), tf.cast(special, tf.int64))
        ids = tf.concat([special_ids, bpe_ids], axis=1)  # each piece has one or the other
        return tf.cast(tf.RaggedTensor.from_row_splits(ids, pieces.row_splits).merge_dims(1, 2), tf.int32)

    def _words(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """[n] texts -> ragged [n, words] that merge independently: each word is a run of spaces
        and the bytes up to the next space, rejoined where the preceding byte is a joiner."""
        import tensorflow_text as tf_text

        pattern = " *[^ ]+| +"
        words = tf_text.regex_split(texts, pattern, pattern)
        if not self.joiners:
            return words
        flat = words.flat_values
        last = tf.strings.substr(flat, -1, 1)
        joins = tf.reduce_any(tf.equal(last[:, None], tf.constant([bytes([b]) for b in self.joiners])[None, :]), axis=1)
        starts = tf.equal(tf.strings.substr(flat, 0, 1), " ")
        first = tf.scatter_nd(words.row_starts()[:, None], tf.ones_like(words.row_starts(), tf.bool),
                              tf.shape(flat, out_type=tf.int64))
        joined = starts & ~first & tf.concat([[False], joins[:-1]], axis=0)
        new_word = tf.cast(~joined, tf.int64)
        segment = tf.cumsum(new_word) - 1
        flat = tf.strings.unsorted_segment_join(flat, segment, tf.reduce_sum(new_word))
        lengths = tf.math.unsorted_segment_sum(new_word, words.value_rowids(), words.nrows())
        return tf.RaggedTensor.from_row_lengths(flat, lengths)

    def detokenize(self, ids: tf.RaggedTensor) -> tf.Tensor:
        text = tf.strings.reduce_join(self.id_to_token.lookup(tf.cast(ids, tf.int64)), axis=-1)
        chars = tf.strings.unicode_split(text, "UTF-8")
        return tf.strings.reduce_join(self.char_to_byte.lookup(chars), axis=-1)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def for_tokenizer(tokenizer) -> GraphBPE | None:
    """A GraphBPE for a keras-hub byte-level BPE tokenizer (None for other tokenizers, whose
    graph path is their own)."""
    import keras_hub

    if not isinstance(tokenizer, keras_hub.tokenizers.BytePairTokenizer):
        return None
    if getattr(tokenizer, "add_prefix_space", False):
        raise ValueError("byte-level BPE with add_prefix_space=True is not supported by the generating "
                         "export")
    return GraphBPE(dict(tokenizer.vocabulary), list(tokenizer.merges),
                    list(tokenizer.unsplittable_tokens or []))


def check(graph_tokenize, tokenizer, texts: list[str]) -> list[int]:
    """Indices of `texts` whose graph ids differ from the eager tokenizer's (training) ids."""
    from kft.data import inputs

    if not texts:
        return []
    expected = inputs.word_pieces(tokenizer, texts)
    got = graph_tokenize(tf.constant(texts))
    return [i for i, (a, b) in enumerate(zip(expected.to_list(), got.to_list())) if a != b]
