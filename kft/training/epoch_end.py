"""The end of an epoch: score the eval predictions, keep the best epoch's weights, count patience.

Which epoch is best follows the task's eval score, higher is better: accuracy by default, or the
score a task's epoch evaluation returns as "score" (entity F1 for tagging, F1 for question answering,
minus the loss for language models). `eval_score` names it, so the state and the logs say which.
"""

from __future__ import annotations

import time
from typing import Protocol

import tensorflow as tf
from absl import logging

from kft.config import Config
from kft.training import checkpoints
from kft.training import progress as progress_lib
from kft.training.train_state import TrainState


class EpochHook(Protocol):
    """Called after each epoch-end evaluation with the epoch number (1-based), its score (higher is
    better; see `eval_score`) and the task's whole eval result ("accuracy", "loss", and the task's
    own entries). kft.tune reports the score to Optuna there; an exception it raises (a pruned
    trial) ends the run."""

    def __call__(self, epoch: int, score: float, scores: dict) -> None: ...


def eval_score(result: dict) -> tuple[str, float]:
    """(what the score is, the score) of an epoch evaluation's `result`.

    Without a "score" entry the score is the accuracy. With one, its name is the result's entry
    holding the same value: the task's own metrics first, then minus the loss, then the accuracy
    (a tagging task returns token accuracy beside entity F1, which may coincide); "score" if none.
    """
    if "score" not in result:
        return "accuracy", result["accuracy"]
    score = result["score"]
    own = [k for k in result if k not in ("score", "accuracy", "loss")]
    for name in (*own, "-loss", "accuracy"):
        value = result.get(name.lstrip("-"))
        if isinstance(value, (int, float)) and (-value if name.startswith("-") else value) == score:
            return name, score
    return "score", score


class EpochEnd:
    """Scores each epoch's eval predictions into the state's history, saves the best epoch's model
    weights to `best_dir` (chief only) and stops the run after --early_stopping_patience epochs
    without a better score."""

    def __init__(self, evaluate_fn, config: Config, best_dir: str, model, is_chief: bool):
        # outputs -> dict with "accuracy" and "loss" (and "score" where higher-is-better is not accuracy)
        self.evaluate_fn = evaluate_fn
        self.config, self.best_dir = config, best_dir
        self.model, self.is_chief = model, is_chief

    def finish(self, state: TrainState, outputs, started: float, summary_writer=None) -> tuple[float, dict]:
        """Scores `outputs` (predicted since `started`, a time.time()) for the epoch `state` is at,
        then moves `state` to the next epoch; returns (score, the eval result) for the epoch hook."""
        c = self.config
        result = self.evaluate_fn(outputs)
        entry = {"epoch": state.epoch + 1, "step": state.step, "loss": state.epoch_loss(),
                 "val_loss": result["loss"], "val_accuracy": result["accuracy"]}
        state.history.append(entry)
        metric, score = eval_score(result)
        also = f", eval {metric} {score:.4f}" if metric not in ("accuracy", "-loss") else ""
        logging.info("epoch %d/%d done at step %d: train loss %.4f, eval loss %.4f, eval accuracy %.4f%s "
                     "(evaluated in %s)", entry["epoch"], c.epochs, entry["step"], entry["loss"],
                     entry["val_loss"], entry["val_accuracy"], also, progress_lib.duration(time.time() - started))
        if summary_writer is not None:
            with summary_writer.as_default(step=state.step):
                tf.summary.scalar("eval/loss", entry["val_loss"])
                tf.summary.scalar("eval/accuracy", entry["val_accuracy"])
        self._keep_best(state, entry, metric, score)
        state.start_next_epoch()
        return score, result

    def _keep_best(self, state: TrainState, entry: dict, metric: str, score: float) -> None:
        state.best_eval_metric = metric  # also names the score a checkpoint from before the rename kept
        if state.best_eval_score is None or score > state.best_eval_score:
            state.best_eval_score, state.best_epoch, state.epochs_without_gain = score, entry["epoch"], 0
            if self.is_chief:
                checkpoints.save(self.best_dir, state.step, self.model.variables, [],
                                 {"epoch": entry["epoch"], "val_accuracy": entry["val_accuracy"],
                                  "eval_metric": metric, "eval_score": score}, keep=1)
            return
        state.epochs_without_gain += 1
        if 0 < self.config.early_stopping_patience <= state.epochs_without_gain:
            logging.info("early stopping: no eval %s gain for %d epoch(s)", metric, state.epochs_without_gain)
            state.stopped_early = True

    def restore_best(self, state: TrainState) -> bool:
        """With early stopping: puts the best epoch's weights back in the model; True if it did."""
        if self.config.early_stopping_patience <= 0 or state.best_eval_score is None:
            return False
        best = checkpoints.latest(self.best_dir)
        if best is None:
            return False
        checkpoints.restore(best, self.model.variables, [])
        logging.info("restored the best weights: epoch %d, eval %s %.4f", state.best_epoch,
                     state.best_eval_metric or "score", state.best_eval_score)
        return True
