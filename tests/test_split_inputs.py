"""The set-up every task's prepare starts from (kft/data/split_inputs.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from kft.data import split_inputs
from kft.data.sources import DataError


def test_splits_are_named_train_eval_and_test_only_where_a_test_split_was_given():
    data = types.SimpleNamespace(train="a", eval="b", test=None)
    assert split_inputs.by_name(data) == {"train": "a", "eval": "b"}
    data.test = "c"
    assert list(split_inputs.by_name(data).items()) == [("train", "a"), ("eval", "b"), ("test", "c")]


def test_the_token_cache_is_off_without_cache_tokens_and_under_model_dir_with_it(monkeypatch):
    off = types.SimpleNamespace(cache_tokens=False)
    assert split_inputs.token_cache_site(off, "/runs/x", tokenizer=None) == (None, None)
    monkeypatch.setattr(split_inputs.token_cache, "tokenizer_fingerprint", lambda tokenizer: f"sha-{tokenizer}")
    on = types.SimpleNamespace(cache_tokens=True)
    assert split_inputs.token_cache_site(on, "/runs/x", tokenizer="t") == ("/runs/x/token_cache", "sha-t")


def test_rows_are_left_aligned_and_filled_to_the_longest():
    rows = [np.array([5, 6, 7]), np.array([8]), np.array([], np.int32)]
    matrix = split_inputs.padded(rows, split_inputs.IGNORE)
    assert matrix.dtype == np.int32
    np.testing.assert_array_equal(matrix, [[5, 6, 7], [8, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(split_inputs.row_lengths(rows), [3, 1, 0])


@pytest.mark.parametrize("n, fraction", [(2, 0.5), (2, 0.99), (10, 0.01), (10, 0.3), (5, 0.9)])
def test_a_held_out_split_keeps_at_least_one_item_on_each_side(n, fraction):
    config = types.SimpleNamespace(seed=3, validation_fraction=fraction)
    held = split_inputs.held_out(n, config, "unused")
    assert 1 <= len(held) <= n - 1
    assert len(set(held.tolist())) == len(held) and all(0 <= i < n for i in held)
    np.testing.assert_array_equal(held, split_inputs.held_out(n, config, "unused"))  # seeded


def test_holding_out_from_fewer_than_two_items_is_refused_with_the_callers_message():
    config = types.SimpleNamespace(seed=0, validation_fraction=0.2)
    with pytest.raises(DataError, match="give more data"):
        split_inputs.held_out(1, config, "give more data")
