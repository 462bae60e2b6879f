"""The training loop: distributed steps, step-exact checkpoints, preemption and divergence.

Why not `model.fit`: Keras resumes only at epoch boundaries and cannot restore the position
inside an epoch. Here the batches of an epoch are a pure function of (seed, epoch), the dropout
seed states are model variables, and a checkpoint records (epoch, batch), so a resumed run sees
exactly the batches, and draws exactly the dropout masks, that the uninterrupted run would have.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft.config import Config
from kft.data import inputs
from kft.training import checkpoints
from kft.training import distribute
from kft.training import progress as progress_lib
from kft.training.compiled_steps import CompiledSteps
from kft.training.epoch_end import EpochEnd, EpochHook
from kft.training.preemption import SigtermFlag, StopRequests
from kft.training.train_state import TrainState
# Callers (the trainer, the tasks, the entry points) name these through `loop`.
from kft.training.feed import (Feed, distributed_dataset, eval_batch_size, in_split_order,  # noqa: F401
                               train_buckets)
from kft.training.preemption import (EXIT_PREEMPTED, Preempted, PreemptedAfterTraining,  # noqa: F401
                                     StopOnSigterm, sigterm_scope)
from kft.training.train_state import RESUMABLE_CHANGES  # noqa: F401
from kft.exit_codes import EXIT_DIVERGED  # noqa: F401  (the exit status after the loss became NaN/Inf)


class Diverged(RuntimeError):
    """The training loss became NaN or Inf."""


class Loop:
    """Trains `model` with `optimizer` under `strategy`, checkpointing to `<model_dir>/checkpoints`.

    It runs the pieces named for their jobs: the compiled steps (compiled_steps.py), the state a
    checkpoint saves (train_state.py), the epoch-end evaluation and patience (epoch_end.py) and
    the stop check of a preemption (preemption.py).
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn,
                 strategy: tf.distribute.Strategy, config: Config, model_dir: str, train: Feed,
                 eval_feed: Feed, evaluate_fn, static_shapes: bool, jit_compile: bool,
                 predict_fn=None):
        self.model, self.optimizer = model, optimizer
        self.strategy, self.config = strategy, config
        self.train, self.eval = train, eval_feed
        self.static_shapes = static_shapes
        self.worker = distribute.worker_info(strategy)
        self.ckpt_dir = f"{model_dir}/checkpoints"
        self.best_dir = f"{model_dir}/best"
        self.steps_per_epoch = len(self.plan(0))
        self.total_steps = self.steps_per_epoch * config.epochs
        # Eval probabilities of the current weights (set at epoch ends), so the final report
        # does not predict the eval split a second time.
        self.eval_probabilities = None
        self.seconds = {"steps": 0.0, "eval": 0.0, "checkpoints": 0.0}  # where run() spends its time
        # The first call into the train function traces and optimizes its graph (part of "steps").
        self.first_call_seconds = None
        # Called with the step count after every call into the train function, and with force=True
        # when training (re)starts: the pruning schedule recomputes its masks there.
        self.step_hook = None
        # Called as epoch_hook(epoch, score, scores) after each epoch-end evaluation: see EpochHook.
        self.epoch_hook: EpochHook | None = None
        optimizer.build(model.trainable_variables)  # its variables exist before any restore
        self.steps = CompiledSteps(model, optimizer, loss_fn, strategy, jit_compile, predict_fn)
        self.epoch_end = EpochEnd(evaluate_fn, config, self.best_dir, model, self.worker.is_chief)

    @property
    def trace_count(self) -> int:
        return self.steps.trace_count

    def refresh_predict_function(self) -> None:
        """Traces prediction again: after the model's layers changed (quantized), the old trace
        would keep computing with the variables it captured."""
        self.steps.refresh_predict_function()

    # -- data ----------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> inputs.BatchPlan:
        """The batches of training epoch `epoch` (0-based): a pure function of the seed and epoch."""
        c = self.config
        return inputs.train_plan(self.train.lengths, c.batch_size, train_buckets(self.train, c), c.seed, epoch,
                                 self.static_shapes)

    def predict(self, feed: Feed) -> np.ndarray:
        """Model outputs for every example of `feed`, in its original order: [n, classes], or
        [n, longest, tags] for per-position outputs (zero beyond each batch's width)."""
        plan = inputs.eval_plan(feed.lengths, eval_batch_size(self.config), self.config.num_buckets,
                                self.static_shapes)
        iterator = iter(distributed_dataset(self.strategy, plan, feed))
        return in_split_order(feed, plan, (self.steps.predict_step(iterator).numpy() for _ in plan.indices))

    # -- state ---------------------------------------------------------------------------------------

    def _save(self, state: TrainState) -> str | None:
        if not self.worker.is_chief:
            return None
        t0 = time.time()
        path = state.save(self.ckpt_dir, self.model.variables, self.optimizer.variables,
                          self.config.keep_checkpoints)
        self.seconds["checkpoints"] += time.time() - t0
        logging.info("checkpoint %s (%.1fs)", path, time.time() - t0)
        return path

    def restore_or_start(self) -> TrainState:
        """The state to continue from: the newest usable checkpoint's, or a fresh one."""
        if self.worker.is_chief:
            checkpoints.remove_partial(self.ckpt_dir)
        ckpt = checkpoints.latest(self.ckpt_dir)
        if ckpt is None:
            return TrainState.fresh(self.config)
        state = TrainState.restore(ckpt, self.config, self.model.variables, self.optimizer.variables)
        logging.info("resumed from %s: step %d, epoch %d, batch %d of %d", ckpt.path, state.step,
                     state.epoch + 1, state.batch, self.steps_per_epoch)
        return state

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, state: TrainState, summary_writer=None) -> TrainState:
        """Trains from `state` to the end (or early stop); returns the final state."""
        c = self.config
        progress = progress_lib.Progress(self.total_steps, state.step)
        if self.step_hook is not None and state.epoch < c.epochs:
            self.step_hook(state.step, True)
        with SigtermFlag() as flag, progress:
            stop = StopRequests(flag, self.steps.any_worker if self.worker.count > 1 else None)
            while state.epoch < c.epochs and not state.stopped_early:
                self._run_epoch(state, progress, stop, summary_writer)
                self._end_epoch(state, summary_writer)
                path = self._save(state)
                # A SIGTERM during the epoch-end evaluation or checkpoint: stop here, all saved (after
                # the last epoch too, or it would go unanswered through the final evaluation).
                stop.stop_if_requested(state.step, lambda: path)
        if self.epoch_end.restore_best(state):
            self.eval_probabilities = None
        return state

    def _run_epoch(self, state: TrainState, progress, stop: StopRequests, summary_writer) -> None:
        """Trains the rest of the epoch `state` is in, in calls of up to --steps_per_execution steps;
        checkpoints every --checkpoint_every_steps, and after any call when asked to stop."""
        c = self.config
        log_every = c.log_every_steps or max(1, self.steps_per_epoch // 10)
        curve_every = max(1, self.total_steps // 200)
        plan = self.plan(state.epoch).slice(state.batch)
        examples, tokens = progress_lib.batch_counts(plan.indices, self.train.lengths)
        iterator = iter(distributed_dataset(self.strategy, plan, self.train))
        done = 0
        while done < len(plan):
            losses = self._train_chunk(iterator, self._chunk_size(state.step, len(plan) - done), state.step)
            for i, loss in enumerate(losses):
                state.record_step(float(loss), curve_every)
                epoch = f"{state.epoch + 1}/{c.epochs}"
                progress.update(state.step, epoch, float(loss), int(examples[done + i]), int(tokens[done + i]))
                if state.step % log_every == 0:
                    self._log_step(state, float(loss), progress.line(epoch, float(loss)), summary_writer)
            done += len(losses)
            stop.stop_if_requested(state.step, lambda: self._save(state))
            if done < len(plan) and c.checkpoint_every_steps > 0 and state.step % c.checkpoint_every_steps == 0:
                self._save(state)

    def _chunk_size(self, step: int, remaining: int) -> int:
        """Steps of the next call: at most --steps_per_execution, ending at the epoch's end or the
        next --checkpoint_every_steps multiple, so checkpoints land on the same steps either way."""
        c = self.config
        to_ckpt = c.checkpoint_every_steps - step % c.checkpoint_every_steps if c.checkpoint_every_steps > 0 \
            else remaining
        return max(1, min(c.steps_per_execution, remaining, to_ckpt))

    def _train_chunk(self, iterator, n: int, step: int) -> np.ndarray:
        """Runs steps step+1 .. step+n; their losses, or Diverged at the first that is not finite."""
        t_chunk = time.time()
        losses = self.steps.train_chunk(iterator, tf.constant(n)).numpy()
        self.seconds["steps"] += time.time() - t_chunk
        if self.first_call_seconds is None:
            self.first_call_seconds = time.time() - t_chunk
        if self.step_hook is not None:
            self.step_hook(step + n)
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            self._diverged(step + int(bad[0]) + 1, float(losses[bad[0]]))
        return losses

    def _log_step(self, state: TrainState, loss: float, line: str, summary_writer) -> None:
        logging.info("%s", line)
        if summary_writer is not None:
            with summary_writer.as_default(step=state.step):
                tf.summary.scalar("train/loss", loss)
                tf.summary.scalar("train/learning_rate", float(self.optimizer.learning_rate))

    def _diverged(self, step: int, value: float) -> None:
        steps = checkpoints.list_steps(self.ckpt_dir)
        last = checkpoints.path_for(self.ckpt_dir, steps[-1]) if steps else "none written yet"
        raise Diverged(f"training loss became {value} at step {step}; stopped without saving or "
                       f"exporting. Last good checkpoint: {last}. Lower --learning_rate or check "
                       "--clipnorm.")

    def _end_epoch(self, state: TrainState, summary_writer) -> None:
        t0 = time.time()
        logging.info("epoch %d/%d: evaluating %s eval examples ...", state.epoch + 1, self.config.epochs,
                     f"{len(self.eval.lengths):,}")
        outputs = self.eval_probabilities = self.predict(self.eval)
        self.seconds["eval"] += time.time() - t0
        epoch = state.epoch + 1
        score, result = self.epoch_end.finish(state, outputs, t0, summary_writer)
        if self.epoch_hook is not None:
            self.epoch_hook(epoch, score, result)


def mean_cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))) if len(labels) else math.nan
