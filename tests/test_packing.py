"""Sequence packing (--pack_sequences): rows of whole examples, each seeing only itself."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import decoder_fixtures as fx
from kft.models import backbones
from kft.training import trainer
from kft.config import Config, FlagError
from kft.tasks.causal_lm import model as lm_model, packing
from test_causal_lm import _config as _lm_config


def _config(**overrides):
    return _lm_config(**({"max_new_tokens": 0} | overrides))


def test_rows_hold_every_example_once_and_never_exceed_the_capacity():
    lengths = np.asarray([7, 3, 9, 2, 5, 5, 1, 10, 4])
    rows = packing.bins(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == int(np.ceil(lengths.sum() / 10))  # first-fit decreasing is tight here
    assert packing.bins(lengths, 10) == rows  # deterministic
    with pytest.raises(ValueError, match="example 7 has 10 tokens"):
        packing.bins(lengths, 9)


def test_packed_labels_never_cross_examples_and_segments_mark_each_one():
    ids = np.asarray([[5, 6, 7, 0], [8, 9, 0, 0], [3, 4, 5, 6]], np.int32)
    lengths = np.asarray([3, 2, 4])
    labels = np.asarray([[-1, 7, -1, -1], [9, -1, -1, -1], [4, 5, 6, -1]], np.int32)
    rows = packing.pack(ids, lengths, labels, capacity=6, pad_id=0)
    assert rows.rows_of == [[2, 1], [0]]
    np.testing.assert_array_equal(rows.ids[0], [3, 4, 5, 6, 8, 9])
    np.testing.assert_array_equal(rows.labels[0], [4, 5, 6, -1, 9, -1])
    np.testing.assert_array_equal(rows.segments, [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows.lengths, [6, 3])
    np.testing.assert_array_equal(rows.sizes, [4, 1])


def test_an_example_in_a_packed_row_has_the_loss_and_states_it_has_alone(llama_folder):
    loaded = backbones.load_decoder(llama_folder)
    plain = lm_model.build_model(loaded.backbone)
    packed = lm_model.build_model(loaded.backbone, packed=True)
    rng = np.random.default_rng(1)
    lengths = np.asarray([9, 5, 7])
    ids = np.zeros((3, 9), np.int32)
    labels = np.full((3, 9), -1, np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, 60, n)
        labels[i, 1:n - 1] = ids[i, 2:n]  # a completion from position 1 on
    rows = packing.pack(ids, lengths, labels, capacity=21, pad_id=0)
    assert rows.rows_of == [[0, 2, 1]]
    loss = lm_model.loss_function(plain)
    alone_hidden = [plain({"token_ids": ids[i:i + 1, :n], "padding_mask": np.ones((1, n), np.int32)}).numpy()[0]
                    for i, n in enumerate(lengths)]
    alone = sum(float(loss(labels[i:i + 1, :n], alone_hidden[i][None])[0]) for i, n in enumerate(lengths))
    mask = (rows.segments > 0).astype(np.int32)
    hidden = packed({"token_ids": rows.ids, "padding_mask": mask, "segment_ids": rows.segments}).numpy()
    together = float(lm_model.loss_function(packed)(rows.labels, hidden)[0])
    assert together == pytest.approx(alone, rel=1e-5)
    at = 0
    for i in rows.rows_of[0]:
        np.testing.assert_allclose(hidden[0, at:at + lengths[i]], alone_hidden[i], atol=2e-5)
        at += lengths[i]
    # without segment ids the examples would see each other: the later ones' states change
    crossed = packed({"token_ids": rows.ids, "padding_mask": mask}).numpy()
    assert not np.allclose(crossed[0, 9:16], alone_hidden[2], atol=1e-3)


def test_a_packed_run_trains_on_fewer_fuller_rows(llama_folder, tmp_path):
    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(24, 0))
    dev = fx.write_jsonl(tmp_path / "dev.jsonl", fx.chats(6, 1))
    runs = {}
    for name, pack in (("plain", False), ("packed", True)):
        config = _config(backbone=llama_folder, train_file=train, eval_file=dev, method="lora",
                         pack_sequences=pack, sequence_length=96, epochs=2, model_dir=str(tmp_path / name))
        runs[name] = trainer.train_and_evaluate(config, str(tmp_path / name))
    plain, packed = runs["plain"], runs["packed"]
    rows = packed["data"]["train"]["packed"]
    assert rows["examples"] == 24 and rows["rows"] < 24 and rows["mean_examples_per_row"] > 1
    assert packed["training"]["steps"] < plain["training"]["steps"]
    assert packed["data"]["train"]["padding_share"] < plain["data"]["train"]["padding_share"]
    # the rows hold every trained token of the examples, none lost or added by packing
    assert rows["trained_tokens"] == plain["data"]["train"]["trained_tokens"]
    assert rows["tokens"] == round(plain["data"]["train"]["mean_tokens"] * 24)
    history = packed["training"]["history"]  # evaluation (not packed) sees the packed training help
    assert len(history) == 2 and history[1]["val_loss"] < history[0]["val_loss"]
    saved = json.load(open(os.path.join(tmp_path, "packed", "metrics.json")))
    assert saved["config"]["pack_sequences"] is True
    # the run loads back (kft.explain, kft.predict) with its trained weights
    from kft.training import runs

    loaded_run = runs.load_run(str(tmp_path / "packed"))
    ids = np.arange(3, 15, dtype=np.int32)[None]
    features = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    fresh = backbones.load_decoder(llama_folder).backbone(features).numpy()
    reloaded = loaded_run.model(features).numpy()
    assert not np.allclose(reloaded, fresh, atol=1e-4)  # trained, not the pretrained weights


def test_packing_is_refused_where_an_example_would_not_see_what_it_sees_alone(llama_folder, gpt2_folder, tmp_path):
    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(8, 0))
    with pytest.raises(FlagError, match="--pack_sequences supports llama-family decoders.*GPT2Backbone"):
        trainer.train_and_evaluate(_config(backbone=gpt2_folder, train_file=train, validation_fraction=0.25,
                                           pack_sequences=True), str(tmp_path / "g"))
    with pytest.raises(FlagError, match="--pack_sequences with --method=prompt"):
        trainer.train_and_evaluate(_config(backbone=llama_folder, train_file=train, validation_fraction=0.25,
                                           pack_sequences=True, method="prompt"), str(tmp_path / "p"))
    with pytest.raises(FlagError, match="--pack_sequences applies to --task=causal_lm"):
        trainer.train_and_evaluate(Config(dataset="sample_reviews", pack_sequences=True), str(tmp_path / "c"))


MIRRORED = r"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
import decoder_fixtures as fx
from test_causal_lm import _config
from kft.training import trainer
folder, tmp = sys.argv[1:3]
train = fx.write_jsonl(tmp + "/train.jsonl", fx.chats(24, 0))
dev = fx.write_jsonl(tmp + "/dev.jsonl", fx.chats(4, 1))
weights, steps = {}, {}
for strategy in ("cpu", "mirrored"):
    config = _config(backbone=folder, train_file=train, eval_file=dev, method="lora", max_new_tokens=0,
                     pack_sequences=True, gradient_checkpointing=True, sequence_length=96, strategy=strategy,
                     deterministic=True, model_dir=tmp + "/" + strategy)
    fitted = trainer.fit_model(config, tmp + "/" + strategy)
    weights[strategy] = [v.numpy() for v in fitted.model.trainable_variables]
    steps[strategy] = fitted.metrics["training"]["steps"]
gap = max(float(np.abs(a - b).max()) for a, b in zip(weights["cpu"], weights["mirrored"]))
print(json.dumps({"steps": steps, "gap": gap}))
"""


@pytest.mark.slow
def test_packed_checkpointed_training_over_two_replicas_matches_one_device(llama_folder, tmp_path):
    from conftest import run_python

    proc = run_python(["-c", MIRRORED, llama_folder, str(tmp_path)], env={"KFT_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"]["cpu"] == out["steps"]["mirrored"] > 0
    assert out["gap"] < 1e-5, out  # measured: 7e-9
