"""The training loop's pieces on a tiny Keras model: the best-epoch score and its name, the state a
checkpoint keeps (and reads from before the score was renamed), the epoch hook, the stop check."""

import inspect
import logging
import os
import re
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kft.config import Config
from kft.data import inputs
from kft.training import checkpoints
from kft.training import loop as loop_lib
from kft.training import preemption
from kft.training import trainer
from kft.training.epoch_end import EpochHook, eval_score
from kft.training.train_state import TrainState

N, WIDTH, VOCABULARY = 24, 6, 30


class _Tiny(keras.Model):
    """Mean of token embeddings -> softmax over 2 classes. Every name fixed: a checkpoint names its
    variables, and Keras numbers auto-generated names by how many objects the process made."""

    def __init__(self):
        super().__init__(name="tiny")
        self.embed = keras.layers.Embedding(VOCABULARY, 4, name="embed")
        self.head = keras.layers.Dense(2, activation="softmax", name="head")

    def call(self, features, training=False):
        mask = ops.cast(features["padding_mask"], "float32")[..., None]
        pooled = ops.sum(self.embed(features["token_ids"]) * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
        return self.head(pooled)


def _feed(seed: int) -> loop_lib.Feed:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCABULARY, size=(N, WIDTH)).astype(np.int32)
    return loop_lib.Feed(tf.constant(ids), rng.integers(2, WIDTH + 1, size=N), rng.integers(0, 2, size=N),
                         np.ones(N, np.float32))


def _config(**overrides) -> Config:
    base = dict(epochs=2, batch_size=4, learning_rate=1e-2, num_buckets=1, seed=0, checkpoint_every_steps=0)
    return Config(**{**base, **overrides})


def _loop(model_dir, config: Config, scores=None) -> loop_lib.Loop:
    """A Loop over the tiny model; each epoch-end evaluation returns the next of `scores`."""
    keras.utils.set_random_seed(0)
    model = _Tiny()
    model({"token_ids": np.zeros((1, WIDTH), np.int32), "padding_mask": np.ones((1, WIDTH), np.int32)})
    results = iter(scores or [])

    def evaluate(outputs):
        return next(results, {"accuracy": 0.5, "loss": 0.7})

    return loop_lib.Loop(model, keras.optimizers.Adam(config.learning_rate, name="adam"),
                         keras.losses.sparse_categorical_crossentropy, tf.distribute.get_strategy(), config,
                         str(model_dir), _feed(0), _feed(1), evaluate, False, False)


def _saved_state(model_dir) -> dict:
    return checkpoints.latest(os.path.join(str(model_dir), "checkpoints")).state


def test_the_epoch_score_is_named_for_the_quantity_it_holds():
    assert eval_score({"accuracy": 0.8, "loss": 0.3}) == ("accuracy", 0.8)
    # token accuracy may equal entity F1: the task's own metric is the one it scores by
    assert eval_score({"accuracy": 0.5, "loss": 0.3, "entity_f1": 0.5, "score": 0.5}) == ("entity_f1", 0.5)
    assert eval_score({"accuracy": 0.4, "loss": 1.2, "score": 61.0, "f1": 61.0}) == ("f1", 61.0)
    assert eval_score({"accuracy": 0.3, "loss": 2.5, "score": -2.5}) == ("-loss", -2.5)
    assert eval_score({"accuracy": 0.3, "loss": 2.5, "score": 0.9}) == ("score", 0.9)


def test_the_state_keeps_the_best_eval_score_and_names_its_metric(tmp_path):
    scores = [{"accuracy": 0.9, "loss": 0.5, "entity_f1": 0.4, "score": 0.4},
              {"accuracy": 0.6, "loss": 0.6, "entity_f1": 0.7, "score": 0.7}]
    loop = _loop(tmp_path, _config(), scores)
    state = loop.run(loop.restore_or_start())
    assert (state.best_eval_score, state.best_eval_metric, state.best_epoch) == (0.7, "entity_f1", 2)
    saved = _saved_state(tmp_path)
    assert (saved["best_eval_score"], saved["best_eval_metric"]) == (0.7, "entity_f1")
    assert "best_accuracy" not in saved


def test_early_stopping_and_the_restored_best_weights_log_the_metric_by_name(tmp_path, caplog):
    scores = [{"accuracy": 0.5, "loss": 0.5, "f1": 60.0, "score": 60.0},
              {"accuracy": 0.9, "loss": 0.4, "f1": 50.0, "score": 50.0}]
    loop = _loop(tmp_path, _config(epochs=3, early_stopping_patience=1), scores)
    with caplog.at_level(logging.INFO):
        state = loop.run(loop.restore_or_start())
    assert state.stopped_early and len(state.history) == 2
    assert "early stopping: no eval f1 gain for 1 epoch(s)" in caplog.text
    assert "restored the best weights: epoch 1, eval f1 60.0000" in caplog.text
    assert "accuracy gain" not in caplog.text


def test_a_checkpoint_that_calls_its_best_score_best_accuracy_resumes_with_that_score(tmp_path):
    loop = _loop(tmp_path, _config(epochs=1), [{"accuracy": 0.5, "loss": 0.7, "score": -0.7}])
    loop.run(loop.restore_or_start())
    folder = os.path.join(str(tmp_path), "checkpoints")
    ckpt = checkpoints.latest(folder)
    # the state as a kft from before the rename wrote it
    state = {k: v for k, v in ckpt.state.items() if k not in ("model_variables", "optimizer_variables")}
    state["best_accuracy"] = state.pop("best_eval_score")
    del state["best_eval_metric"]
    state["config"]["epochs"] = 2
    checkpoints.save(folder, ckpt.step, loop.model.variables, loop.optimizer.variables, state)
    resumed = _loop(tmp_path, _config(epochs=2), [{"accuracy": 0.6, "loss": 0.9, "score": -0.9}])
    start = resumed.restore_or_start()
    assert (start.epoch, start.best_eval_score, start.best_epoch) == (1, -0.7, 1)
    end = resumed.run(start)
    assert (end.best_eval_score, end.best_eval_metric, end.best_epoch, end.epochs_without_gain) == \
        (-0.7, "-loss", 1, 1)


def test_a_train_state_reads_back_from_its_checkpoint_unchanged(tmp_path):
    state = TrainState.fresh(_config())
    for loss in (0.1, 1 / 3, 2.0 ** -40, 7.25):
        state.record_step(loss, curve_every=2)
    state.history.append({"epoch": 1, "val_loss": 0.123456789})
    state.best_eval_score, state.best_eval_metric = 0.1 + 0.2, "accuracy"
    model = _Tiny()
    model({"token_ids": np.zeros((1, WIDTH), np.int32), "padding_mask": np.ones((1, WIDTH), np.int32)})
    path = state.save(str(tmp_path), model.variables, [], keep=1)
    assert TrainState.from_saved(checkpoints.read(path).state) == state


def test_a_train_state_reads_by_field_name_as_the_dict_it_replaced():
    state = TrainState.fresh(_config())
    state.record_step(0.5, curve_every=1)
    assert (state["step"], state["curve_losses"], state["stopped_early"]) == (1, [0.5], False)
    with pytest.raises(KeyError):
        state["best_accuracy"]


def test_the_epoch_hook_gets_the_arguments_its_documentation_names(tmp_path):
    calls = []
    loop = _loop(tmp_path, _config(), [{"accuracy": 0.5, "loss": 0.7, "entity_f1": 0.3, "score": 0.3}])
    loop.epoch_hook = lambda *args: calls.append(args)
    loop.run(loop.restore_or_start())
    documented = re.search(r"`epoch_hook\(([^)]*)\)`", trainer.fit_model.__doc__).group(1).split(", ")
    protocol = list(inspect.signature(EpochHook.__call__).parameters)[1:]
    assert documented == protocol == ["epoch", "score", "scores"]
    assert calls[0] == (1, 0.3, {"accuracy": 0.5, "loss": 0.7, "entity_f1": 0.3, "score": 0.3})
    assert [len(args) for args in calls] == [len(documented)] * 2


def test_the_loops_feed_is_not_one_more_class_named_split():
    from kft.data import sources

    assert not hasattr(loop_lib, "Split")
    assert loop_lib.Feed.__name__ == "Feed" and sources.Split is not loop_lib.Feed


def test_plan_gives_an_epochs_batches_as_the_seed_and_epoch_fix_them(tmp_path):
    loop = _loop(tmp_path, _config())
    expected = inputs.train_plan(loop.train.lengths, 4, 1, 0, 1, False)
    np.testing.assert_array_equal(loop.plan(1).indices, expected.indices)
    assert not np.array_equal(loop.plan(0).indices, expected.indices)


def test_a_stop_asked_on_any_worker_raises_preempted_with_the_checkpoint_it_saves():
    flag = preemption.SigtermFlag()
    saved = []
    alone = preemption.StopRequests(flag)
    alone.stop_if_requested(5, lambda: saved.append(5))  # nobody asked: no save, no stop
    other_worker_votes = preemption.StopRequests(flag, agree=lambda mine: mine + 1)
    with pytest.raises(preemption.Preempted, match="stopped by SIGTERM at step 6; checkpoint ckpt-6"):
        other_worker_votes.stop_if_requested(6, lambda: saved.append(6) or "ckpt-6")
    flag.raised, flag.by = True, "Ctrl-C"
    with pytest.raises(preemption.Preempted, match="stopped by Ctrl-C at step 7"):
        alone.stop_if_requested(7, lambda: saved.append(7) or "ckpt-7")
    assert saved == [6, 7]


def test_a_sigterm_mid_epoch_saves_that_step_and_the_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    config = _config(steps_per_execution=2)
    whole = _loop(tmp_path / "whole", config)
    whole.run(whole.restore_or_start())

    cut = _loop(tmp_path / "cut", config)
    cut.step_hook = lambda step, force=False: step == 4 and os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(loop_lib.Preempted) as stopped:
        cut.run(cut.restore_or_start())
    assert stopped.value.step == 4 and _saved_state(tmp_path / "cut")["batch"] == 4
    resumed = _loop(tmp_path / "cut", config)
    end = resumed.run(resumed.restore_or_start())
    assert end.step == 2 * whole.steps_per_epoch
    for a, b in zip(whole.model.variables + whole.optimizer.variables,
                    resumed.model.variables + resumed.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert _saved_state(tmp_path / "cut")["history"] == _saved_state(tmp_path / "whole")["history"]
