"""Tokenize once, group by length, pad per batch."""

import numpy as np
import pytest
import tensorflow as tf

from kft import backbones, inputs


@pytest.fixture(scope="module")
def loaded(tiny_preset):
    return backbones.load(tiny_preset)


TEXTS = ["good", "a truly wonderful film", "bad", "the plot is nothing but boilerplate", "fine film",
         "the acting is wooden and the dialogue is painful", "ok", "a lovely film with a big heart"]


def test_encode_wraps_texts_in_special_tokens_and_counts_truncation(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, TEXTS, sequence_length=6)
    rows = enc.ids.to_list()
    assert all(r[0] == loaded.packing.start[0] and r[-1] == loaded.packing.end[0] for r in rows)
    raw = inputs.raw_token_lengths(loaded.tokenizer, TEXTS)
    np.testing.assert_array_equal(enc.lengths, np.minimum(raw + 2, 6))
    assert enc.truncated == int((raw > 4).sum()) > 0


def test_sequence_length_default_covers_the_99th_percentile(loaded):
    lengths = np.array([5] * 98 + [40, 200])
    cap = inputs.choose_sequence_length(lengths, loaded.packing, limit=512)
    assert cap == 48  # ceil(percentile 99 of raw = 41.6 -> 42) + 2 specials = 44, rounded up to 8
    assert inputs.choose_sequence_length(lengths, loaded.packing, limit=32) == 32


def test_train_batches_are_padded_only_to_their_longest_text(loaded):
    texts = [" ".join(["film"] * n) for n in np.random.default_rng(0).integers(1, 30, 300)]
    enc = inputs.encode(loaded.tokenizer, loaded.packing, texts, sequence_length=64)
    labels = np.zeros(len(texts), np.int32)
    ds = inputs.train_dataset(enc, labels, batch_size=16, seed=1, num_buckets=8,
                              pad_value=loaded.packing.pad)
    widths, seen, area = [], 0, 0
    for x, _ in ds:
        mask = x["padding_mask"].numpy()
        assert mask.shape == x["token_ids"].shape
        assert mask.sum(axis=1).max() == mask.shape[1], "batch padded beyond its longest text"
        widths.append(mask.shape[1])
        seen += mask.shape[0]
        area += mask.size
    assert seen == len(texts)
    assert len(widths) == inputs.num_train_batches(enc, 16, 8) == int(ds.cardinality())
    assert len(set(widths)) > 4  # many shapes: per-batch padding, not one fixed length
    # Grouping by length wastes far less than padding every batch to the longest text.
    assert enc.lengths.sum() / area > 0.8
    assert enc.lengths.sum() / (len(texts) * enc.lengths.max()) < 0.6


def test_shuffle_is_seeded_and_changes_between_epochs(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, TEXTS * 8, sequence_length=16)
    labels = np.arange(len(TEXTS) * 8, dtype=np.int32)

    def epoch_order(ds):
        return [int(v) for _, y in ds for v in y.numpy()]

    a = inputs.train_dataset(enc, labels, 4, seed=7, num_buckets=2, pad_value=0)
    b = inputs.train_dataset(enc, labels, 4, seed=7, num_buckets=2, pad_value=0)
    first = epoch_order(a)
    assert first == epoch_order(b)
    assert first != epoch_order(a)  # reshuffled for the next epoch
    assert sorted(first) == labels.tolist()


def test_static_shapes_pad_to_bucket_boundaries_and_drop_partial_batches(loaded):
    texts = [" ".join(["film"] * n) for n in np.random.default_rng(1).integers(1, 30, 200)]
    enc = inputs.encode(loaded.tokenizer, loaded.packing, texts, sequence_length=64)
    ds = inputs.train_dataset(enc, np.zeros(200, np.int32), 8, seed=0, num_buckets=4, pad_value=0,
                              static_shapes=True)
    boundaries = inputs.bucket_boundaries(enc.lengths, 4) + [int(enc.lengths.max()) + 1]
    shapes = {tuple(x["token_ids"].shape) for x, _ in ds}
    assert all(b == 8 for b, _ in shapes)
    assert {w for _, w in shapes} <= {b - 1 for b in boundaries}


def test_tokenization_happens_once_not_per_epoch(loaded, monkeypatch):
    calls = []
    real = inputs._graph_tokenizer

    def counting(tokenizer):
        calls.append(1)
        return real(tokenizer)

    monkeypatch.setattr(inputs, "_graph_tokenizer", counting)
    enc = inputs.encode(loaded.tokenizer, loaded.packing, TEXTS, sequence_length=16)
    ds = inputs.train_dataset(enc, np.zeros(len(TEXTS), np.int32), 4, seed=0, num_buckets=2, pad_value=0)
    for _ in range(3):
        for _ in ds:
            pass
    assert len(calls) == 1
    # The dataset holds integer ids, never strings.
    assert all(spec.dtype == tf.int32 for spec in tf.nest.flatten(ds.element_spec[0]))


def test_sorted_dataset_order_round_trips(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, TEXTS, sequence_length=32)
    ds, order = inputs.sorted_dataset(enc, None, batch_size=3, pad_value=0)
    lengths = np.concatenate([x["padding_mask"].numpy().sum(1) for x in ds])
    assert list(lengths) == sorted(lengths)
    np.testing.assert_array_equal(inputs.unsort(lengths, order), enc.lengths)
