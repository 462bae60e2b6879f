"""Word-piece ids of each split, cached under `--model_dir` so that a rerun skips tokenization.

The cache key is a SHA-256 of the tokenizer (class, configuration, vocabulary) and of every text
of the split, so different data or another tokenizer can never read a stale entry. Entries are
written to a temporary name and renamed; an unreadable or inconsistent entry is reported and
the split is tokenized again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from kft.data import inputs

# Bump when what is cached (word pieces, MAX_TEXT_CHARS cut) changes meaning.
FORMAT = 3  # 2: byte-level BPE ids tokenized eagerly (see inputs._needs_eager); 3: accents stripped as
# Hugging Face BERT tokenizers do (backbones._match_hf_accent_stripping)


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides a tokenizer's output: its class, configuration and vocabulary."""
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__name__}".encode())
    config = {k: v for k, v in tokenizer.get_config().items() if k not in ("name", "trainable")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for attribute in ("get_vocabulary", "merges", "proto"):
        value = getattr(tokenizer, attribute, None)
        if callable(value):
            value = value()
        if value is not None:
            h.update(attribute.encode())
            h.update(json.dumps(value, default=str).encode() if not isinstance(value, bytes) else value)
    return h.hexdigest()


def key(fingerprint: str, texts: list[str]) -> str:
    h = hashlib.sha256(f"kft-token-cache-{FORMAT}-{inputs.MAX_TEXT_CHARS}-{fingerprint}".encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _read(path: str, num_texts: int) -> tf.RaggedTensor:
    with tf.io.gfile.GFile(path, "rb") as f:
        saved = np.load(io.BytesIO(f.read()), allow_pickle=False)
        values, row_lengths = saved["values"], saved["row_lengths"]
    if row_lengths.shape != (num_texts,) or int(row_lengths.sum()) != values.shape[0]:
        raise ValueError(f"holds {row_lengths.shape[0]} rows / {values.shape[0]} ids, expected "
                         f"{num_texts} rows summing to the ids")
    return tf.RaggedTensor.from_row_lengths(tf.constant(values, tf.int32), row_lengths)


def _write(path: str, pieces: tf.RaggedTensor) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, values=pieces.flat_values.numpy().astype(np.int32),
             row_lengths=pieces.row_lengths().numpy().astype(np.int64))
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def word_pieces(tokenizer, texts: list[str], cache_dir: str | None, fingerprint: str | None = None,
                write: bool = True) -> tuple[tf.RaggedTensor, bool]:
    """`inputs.word_pieces(tokenizer, texts)`, read from `cache_dir` when cached there.

    Returns the pieces and whether they came from the cache. `cache_dir` None disables caching;
    `write=False` only reads (workers other than the chief never write into the model folder).
    """
    if not cache_dir:
        return inputs.word_pieces(tokenizer, texts), False
    path = os.path.join(cache_dir, key(fingerprint or tokenizer_fingerprint(tokenizer), texts) + ".npz")
    if tf.io.gfile.exists(path):
        try:
            return _read(path, len(texts)), True
        except Exception as e:  # noqa: BLE001 - any damage means: tokenize again
            logging.warning("token cache: ignoring unreadable entry %s (%s); tokenizing again", path, e)
    pieces = inputs.word_pieces(tokenizer, texts)
    if write:
        tf.io.gfile.makedirs(cache_dir)
        _write(path, pieces)
    return pieces, False
