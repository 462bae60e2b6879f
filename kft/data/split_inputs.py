"""The set-up every task's `prepare` starts from: its splits by name, where their token ids are
cached, and ragged id rows padded into the matrices the loop batches.

Kept in one place so that the five tasks name their splits, key their token cache and pad their
rows alike (the loop and the metrics files read the split names; the cache must be found again by
a rerun of any task).
"""

from __future__ import annotations

import os

import numpy as np

from kft.data import token_cache
from kft.data import IGNORE  # noqa: F401  (re-exported: the tasks read it here)
from kft.data.sources import DataError


def by_name(data) -> dict:
    """{"train", "eval"[, "test"]} -> split, from a task's data (test only where it was given)."""
    splits = {"train": data.train, "eval": data.eval}
    if data.test is not None:
        splits["test"] = data.test
    return splits


def token_cache_site(config, model_dir: str, tokenizer) -> tuple[str | None, str | None]:
    """(folder, tokenizer fingerprint) of the token cache under --model_dir; (None, None) with
    --cache_tokens off, so that nothing is read or written."""
    cache_dir = os.path.join(model_dir, "token_cache") if config.cache_tokens else None
    return cache_dir, (token_cache.tokenizer_fingerprint(tokenizer) if cache_dir else None)


def length_origin(config) -> str:
    """Where the sequence length came from, for the data log line."""
    return "given" if config.sequence_length else "99th percentile of train"


def row_lengths(rows) -> np.ndarray:
    """[n] int64: the length of each ragged row."""
    return np.asarray([len(row) for row in rows], np.int64)


def held_out(n: int, config, refusal: str) -> np.ndarray:
    """Indices of the n items a seeded --validation_fraction holds out for evaluation: at least one,
    and at least one left to train on; with fewer than 2 items, a DataError saying `refusal`."""
    if n < 2:
        raise DataError(refusal)
    rng = np.random.default_rng(config.seed)
    k = min(n - 1, max(1, int(round(config.validation_fraction * n))))
    return rng.permutation(n)[:k]


def padded(rows, fill: int) -> np.ndarray:
    """[n, longest] int32: each row left-aligned, followed by `fill` (padding ids or IGNORE labels)."""
    out = np.full((len(rows), int(row_lengths(rows).max(initial=0))), fill, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out
