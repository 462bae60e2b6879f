"""Checkpoint files: complete or absent, verified on load, bad ones skipped with a message."""

import logging
import os

import keras
import numpy as np
import pytest

from conftest import tiny_config
from kft.training import checkpoints
from kft.training import trainer


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.standard_normal((4, 3)).astype("float32"), name="kernel"),
            keras.Variable(np.zeros(3, "float32"), name="bias")]


def test_save_read_restore_round_trip_and_keep_only_the_newest(tmp_path):
    folder = str(tmp_path / "ckpt")
    model, opt = _variables(0), [keras.Variable(np.int64(7), name="iterations")]
    for step in (5, 10, 15, 20):
        checkpoints.save(folder, step, model, opt, {"step": step, "epoch": 1, "batch": 3}, keep=3)
    assert checkpoints.list_steps(folder) == [10, 15, 20]
    assert not [n for n in os.listdir(folder) if ".tmp-" in n]
    target, target_opt = _variables(1), [keras.Variable(np.int64(0), name="iterations")]
    ckpt = checkpoints.latest(folder)
    assert ckpt.step == 20 and ckpt.state["batch"] == 3
    checkpoints.restore(ckpt, target, target_opt)
    for a, b in zip(model + opt, target + target_opt):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_killed_writer_leaves_no_checkpoint_only_a_temporary_file_that_is_cleaned_up(tmp_path):
    folder = str(tmp_path / "ckpt")
    checkpoints.save(folder, 5, _variables(), [], {"step": 5})
    with open(checkpoints.path_for(folder, 10) + ".tmp-999", "wb") as f:
        f.write(b"half a checkpoint")  # what a kill during the write leaves behind
    assert checkpoints.list_steps(folder) == [5]
    assert checkpoints.remove_partial(folder) == 1
    assert os.listdir(folder) == [os.path.basename(checkpoints.path_for(folder, 5))]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_a_data_byte"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_and_says_which(tmp_path, caplog, damage):
    folder = str(tmp_path / "ckpt")
    for step in (5, 10):
        checkpoints.save(folder, step, _variables(step), [], {"step": step})
    newest = checkpoints.path_for(folder, 10)
    blob = open(newest, "rb").read()
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage":
        blob = np.random.default_rng(0).bytes(len(blob))
    else:
        blob = blob[:-5] + bytes([blob[-5] ^ 0xFF]) + blob[-4:]  # inside the last tensor's data
    open(newest, "wb").write(blob)
    with caplog.at_level(logging.WARNING):
        ckpt = checkpoints.latest(folder)
    assert ckpt.step == 5
    assert any(newest in r.getMessage() for r in caplog.records)
    if damage == "flip_a_data_byte":
        assert "checksum mismatch" in caplog.text


def test_no_usable_checkpoint_is_an_error_naming_the_folder(tmp_path):
    folder = str(tmp_path / "ckpt")
    checkpoints.save(folder, 5, _variables(), [], {"step": 5})
    open(checkpoints.path_for(folder, 5), "wb").write(b"\0" * 100)
    with pytest.raises(checkpoints.CheckpointError, match=f"{folder}: none of the 1 checkpoint"):
        checkpoints.latest(folder)
    assert checkpoints.latest(str(tmp_path / "empty")) is None  # no checkpoints: a fresh start


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    folder = str(tmp_path / "ckpt")
    checkpoints.save(folder, 5, _variables(), [], {"step": 5})
    other = [keras.Variable(np.zeros((4, 5), "float32"), name="kernel"), _variables()[1]]
    with pytest.raises(checkpoints.CheckpointError, match="do not match this run"):
        checkpoints.restore(checkpoints.latest(folder), other, [])


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    bad = _variables()
    bad[0].assign(np.full((4, 3), np.nan, "float32"))
    with pytest.raises(checkpoints.CheckpointError, match="NaN/Inf"):
        checkpoints.save(str(tmp_path / "ckpt"), 5, bad, [], {"step": 5})
    assert checkpoints.list_steps(str(tmp_path / "ckpt")) == []


def test_resuming_with_different_training_flags_is_refused(tiny_preset, tmp_path):
    model_dir = str(tmp_path / "model")
    trainer.train_and_evaluate(tiny_config(backbone=tiny_preset), model_dir)
    with pytest.raises(trainer.FlagError, match="--learning_rate: 0.001 then, 0.002 now"):
        trainer.train_and_evaluate(tiny_config(backbone=tiny_preset, learning_rate=2e-3), model_dir)


def test_a_checkpoint_from_before_a_flag_existed_resumes_when_that_flag_has_its_default(
        tiny_preset, tmp_path):
    model_dir = str(tmp_path / "model")
    config = tiny_config(backbone=tiny_preset, epochs=2)
    trainer.train_and_evaluate(tiny_config(backbone=tiny_preset), model_dir)  # 1 epoch
    folder = os.path.join(model_dir, "checkpoints")
    ckpt = checkpoints.latest(folder)
    state = {k: v for k, v in ckpt.state.items() if k not in ("model_variables", "optimizer_variables")}
    del state["config"]["deterministic"]  # as written by a kft without that flag
    state["config"]["epochs"] = 2
    checkpoints.save(folder, ckpt.step, _FromTensors(ckpt, "model"), _FromTensors(ckpt, "optimizer"), state)
    assert trainer.train_and_evaluate(config, model_dir)["training"]["epochs_run"] == 2
    with pytest.raises(trainer.FlagError, match="--clipnorm: 1.0 then, 0.5 now"):
        trainer.train_and_evaluate(tiny_config(backbone=tiny_preset, epochs=2, clipnorm=0.5), model_dir)


class _FromTensors(list):
    """A checkpoint's arrays posing as variables, to rewrite its metadata in a test."""

    def __init__(self, ckpt, prefix):
        paths = ckpt.state[f"{prefix}_variables"]
        super().__init__(_Array(ckpt.tensors[f"{prefix}/{i:05d}"], p.rsplit(":", 1)[0])
                         for i, p in enumerate(paths))


class _Array:
    def __init__(self, value, path):
        self.value, self.path, self.shape = value, path, value.shape

    def numpy(self):
        return self.value
