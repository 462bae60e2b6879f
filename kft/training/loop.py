"""The training loop: distributed steps, step-exact checkpoints, preemption and divergence.

Why not `model.fit`: Keras resumes only at epoch boundaries and cannot restore the position
inside an epoch. Here the batches of an epoch are a pure function of (seed, epoch), the dropout
seed states are model variables, and a checkpoint records (epoch, batch), so a resumed run sees
exactly the batches, and draws exactly the dropout masks, that the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft.training import checkpoints
from kft.training import distribute
from kft.data import inputs
from kft.training import optim
from kft.training import progress as progress_lib
from kft.config import Config, FlagError

# Exit status of `kft.train` after a SIGTERM: EX_TEMPFAIL from sysexits.h, "try again later".
EXIT_PREEMPTED = 75
# Exit status after the loss became NaN/Inf.
EXIT_DIVERGED = 3

# Flags that may differ between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = {"model_dir", "export", "export_dir", "run_name", "strategy", "tpu", "data_dir",
                     "steps_per_execution", "jit_compile", "checkpoint_every_steps",
                     "keep_checkpoints", "log_every_steps", "cache_tokens",
                     "eval_batch_size", "quantize", "serving_sequence_length", "gradient_checkpointing"}


class Preempted(Exception):
    """SIGTERM (or a Ctrl-C) arrived; a checkpoint of the current step was written (on the chief)."""

    def __init__(self, step: int, path: str | None, by: str = "SIGTERM"):
        super().__init__(f"stopped by {by} at step {step}; checkpoint {path or '(written by chief)'}; "
                         "rerun the same command to continue")
        self.step, self.path = step, path


class PreemptedAfterTraining(Preempted):
    """SIGTERM arrived after training had finished and was saved: during evaluation or export."""

    def __init__(self, step: int, saved: str, phase: str):
        Exception.__init__(self, f"stopped by SIGTERM during {phase}, after training had finished at step "
                           f"{step} ({saved}); no export was left half-written. Rerun the same command to "
                           "evaluate and export without training again")
        self.step, self.path, self.phase = step, saved, phase


class Diverged(RuntimeError):
    """The training loss became NaN or Inf."""


@dataclasses.dataclass
class Split:
    """One tokenized split as the loop consumes it."""

    matrix: tf.Tensor  # [n, longest] int32 token ids
    lengths: np.ndarray  # [n]
    labels: np.ndarray  # [n] int32, or [n, longest] for per-position labels
    weights: np.ndarray  # [n] float32 loss weight of each example (class weights)
    sizes: np.ndarray | None = None  # [n] labelled positions per example: the loss is a per-position mean
    # [n, k] or [n, longest, k] float32 (a teacher's log-probabilities): labels become (labels, targets)
    targets: np.ndarray | None = None
    # encoder–decoder tasks: (ids [n, longest] int32, lengths [n]) of the decoder sequence, fed as
    # decoder_token_ids / decoder_padding_mask; per-position labels then align with it
    decoder: tuple | None = None
    # packed rows (--pack_sequences): [n, longest] int32 example index within each row (1, 2, ...;
    # 0 = padding), fed as segment_ids
    segments: np.ndarray | None = None
    # length buckets of the training plan, where not --num_buckets (packed rows, nearly full: one)
    buckets: int | None = None

    @classmethod
    def from_encoded(cls, encoded: inputs.Encoded, labels: np.ndarray, pad: int,
                     weights: np.ndarray | None = None) -> "Split":
        n = len(encoded)
        return cls(inputs.padded_matrix(encoded, pad), encoded.lengths, labels.astype(np.int32),
                   (np.ones(n) if weights is None else weights).astype(np.float32))


def train_buckets(split: Split, config: Config) -> int:
    return split.buckets if split.buckets is not None else config.num_buckets


def distributed_dataset(strategy: tf.distribute.Strategy, plan: inputs.BatchPlan, split: Split):
    """The plan's batches fed to the strategy's replicas, each pipeline building only its slices.

    One replica (one CPU or GPU): a plain dataset, which `strategy.run` accepts as it is.
    tf.distribute would wrap it in a MultiDeviceIterator whose per-device pipeline runs tf.data's
    autotuning thread with default options; deleting such an iterator waits for that thread's
    current sleep (10 ms doubling: an evaluation pass of 11.6 s took 20.5 s, see PERFORMANCE.md).
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1 and not distribute.uses_static_shapes(strategy):
        return inputs.plan_dataset(plan, split.matrix, split.lengths, split.labels, split.weights,
                                   1, None, split.sizes, split.targets, split.decoder, split.segments)

    def dataset_fn(ctx: tf.distribute.InputContext):
        local = replicas // ctx.num_input_pipelines
        ids = range(ctx.input_pipeline_id * local, (ctx.input_pipeline_id + 1) * local)
        return inputs.plan_dataset(plan, split.matrix, split.lengths, split.labels, split.weights,
                                   replicas, ids, split.sizes, split.targets, split.decoder, split.segments)

    return strategy.distribute_datasets_from_function(dataset_fn)


class _SigtermFlag:
    """Set by SIGTERM or a first Ctrl-C (SIGINT) while installed; the loop polls it between steps.

    A second Ctrl-C raises KeyboardInterrupt at once (kft.train reports it in one line)."""

    def __init__(self):
        self.raised = False
        self.by = "SIGTERM"
        self._previous = self._previous_int = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not if ignored
                self._previous_int = signal.signal(signal.SIGINT, self._handle_int)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after the current step")
        self.raised = True

    def _handle_int(self, signum, frame):
        print("\nCtrl-C: saving a checkpoint after the current step, then stopping (Ctrl-C again to stop "
              "at once, without saving)", file=sys.stderr, flush=True)
        self.raised, self.by = True, "Ctrl-C"
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)


class StopOnSigterm:
    """After training: a SIGTERM stops the run at once, as PreemptedAfterTraining.

    Installed once the loop has saved the finished training, so what a preemption cuts short is
    the final evaluation or export, which a rerun redoes from the checkpoint without training;
    the export is renamed into place only when complete (kft/models/savedmodel.py). Set `phase` to name what
    is running. Use it inside `sigterm_scope`, which turns the interruption into the exception and
    puts the previous handler back.
    """

    def __init__(self, ckpt_dir: str, step: int):
        self.step, self.phase = step, "the final evaluation"
        self.saved = (f"saved in {checkpoints.path_for(ckpt_dir, step)}"
                      if step in checkpoints.list_steps(ckpt_dir) else "no training to save")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        raise _Interrupted(PreemptedAfterTraining(self.step, self.saved, self.phase))


class _Interrupted(BaseException):
    """Raised by StopOnSigterm's handler wherever Python happens to be. A BaseException, like
    KeyboardInterrupt: Keras and TensorFlow catch `Exception` inside layers and traced functions
    and raise it again wrapped in a RuntimeError, which would hide the preemption."""


@contextlib.contextmanager
def sigterm_scope():
    """Puts back, when the block ends, the SIGTERM handler that was installed when it began, and
    raises a StopOnSigterm interruption as its PreemptedAfterTraining."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    except _Interrupted as interrupted:
        raise interrupted.args[0] from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Loop:
    """Trains `model` with `optimizer` under `strategy`, checkpointing to `<model_dir>/checkpoints`."""

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, loss_fn,
                 strategy: tf.distribute.Strategy, config: Config, model_dir: str, train: Split,
                 eval_split: Split, evaluate_fn, static_shapes: bool, jit_compile: bool,
                 predict_fn=None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.strategy, self.config, self.model_dir = strategy, config, model_dir
        self.train, self.eval = train, eval_split
        # outputs -> dict with "accuracy" and "loss" (and "score" if higher-is-better is not accuracy)
        self.evaluate_fn = evaluate_fn
        # (features, labels) -> outputs to keep per example; default: the model's outputs
        self.predict_fn = predict_fn
        self.static_shapes = static_shapes
        self.worker = distribute.worker_info(strategy)
        self.ckpt_dir = f"{model_dir}/checkpoints"
        self.best_dir = f"{model_dir}/best"
        self.steps_per_epoch = len(self._plan(0))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.trace_count = 0
        # Eval probabilities of the current weights (set at epoch ends), so the final report
        # does not predict the eval split a second time.
        self.eval_probabilities = None
        self.seconds = {"steps": 0.0, "eval": 0.0, "checkpoints": 0.0}  # where run() spends its time
        # The first call into the train function traces and optimizes its graph (part of "steps").
        self.first_call_seconds = None
        # Called with the step count after every call into the train function, and with force=True
        # when training (re)starts: the pruning schedule recomputes its masks there.
        self.step_hook = None
        # Called with (epoch number, score) after each epoch-end evaluation: kft.tune reports the
        # score to Optuna there, and an exception it raises (a pruned trial) ends the run.
        self.epoch_hook = None
        optimizer.build(model.trainable_variables)  # its variables exist before any restore
        self._train_chunk = self._make_train_function(jit_compile)
        self._predict_step = self._make_predict_function()
        self._any_worker = self._make_agreement_function()

    # -- compiled pieces ---------------------------------------------------------------------------

    def _make_train_function(self, jit_compile: bool):
        model, optimizer, loss_fn, strategy = self.model, self.optimizer, self.loss_fn, self.strategy

        def replica_step(batch):
            features, labels, weights = batch
            with tf.GradientTape() as tape:
                probabilities = model(features, training=True)
                # weights already divide by the global batch's example count: the replicas' sums
                # add up to the global mean loss, and their summed gradients to its gradient.
                loss = tf.reduce_sum(loss_fn(labels, probabilities) * weights)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        if jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        @tf.function
        def train_chunk(iterator, n):
            self.trace_count += 1  # Python side effect: runs once per trace, never per step
            losses = tf.TensorArray(tf.float32, size=n)
            for i in tf.range(n):
                per_replica = strategy.run(replica_step, args=(next(iterator),))
                losses = losses.write(i, strategy.reduce("SUM", per_replica, axis=None))
            return losses.stack()

        return train_chunk

    def _make_predict_function(self):
        model, strategy, predict_fn = self.model, self.strategy, self.predict_fn

        @tf.function
        def predict_step(iterator):
            features, labels, _ = next(iterator)
            if predict_fn is None:
                probabilities = strategy.run(lambda f: model(f, training=False), args=(features,))
            else:
                probabilities = strategy.run(predict_fn, args=(features, labels))
            return strategy.gather(probabilities, axis=0)

        return predict_step

    def _make_agreement_function(self):
        strategy = self.strategy

        @tf.function
        def any_worker(flag):
            return strategy.reduce("SUM", strategy.run(lambda x: tf.identity(x), args=(flag,)), axis=None)

        return any_worker

    def refresh_predict_function(self) -> None:
        """Traces prediction again: after the model's layers changed (quantized), the old trace
        would keep computing with the variables it captured."""
        self._predict_step = self._make_predict_function()

    # -- data ----------------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> inputs.BatchPlan:
        c = self.config
        return inputs.train_plan(self.train.lengths, c.batch_size, train_buckets(self.train, c), c.seed, epoch,
                                 self.static_shapes)

    def predict(self, split: Split) -> np.ndarray:
        """Model outputs for every example of `split`, in its original order: [n, classes], or
        [n, longest, tags] for per-position outputs (zero beyond each batch's width)."""
        plan = inputs.eval_plan(split.lengths, eval_batch_size(self.config), self.config.num_buckets,
                                self.static_shapes)
        iterator = iter(distributed_dataset(self.strategy, plan, split))
        return in_split_order(split, plan, (self._predict_step(iterator).numpy() for _ in plan.indices))

    # -- state ---------------------------------------------------------------------------------------

    def _new_state(self) -> dict:
        return {"step": 0, "epoch": 0, "batch": 0, "epoch_loss_sum": 0.0, "epoch_loss_count": 0,
                "best_accuracy": None, "best_epoch": 0, "epochs_without_gain": 0, "stopped_early": False,
                "history": [], "curve_steps": [], "curve_losses": [], "window": [0.0, 0],
                "config": dataclasses.asdict(self.config),
                # the rate trained with: --learning_rate=0 resolves through a table that may change
                "learning_rate": optim.peak_learning_rate(self.config)[0]}

    def _check_same_run(self, saved: dict, path: str) -> None:
        now = dataclasses.asdict(self.config)
        # A flag added after the checkpoint was written counts as having had its default then.
        defaults = dataclasses.asdict(Config())
        saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
        changed = sorted(k for k in set(saved) | set(now)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if changed:
            detail = ", ".join(f"--{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in changed)
            raise FlagError(f"{path} was written by a run with other flags ({detail}). Use the same "
                            "flags to resume, or another --model_dir to start a new run.")

    def _save(self, state: dict) -> str | None:
        if not self.worker.is_chief:
            return None
        t0 = time.time()
        path = checkpoints.save(self.ckpt_dir, state["step"], self.model.variables,
                                self.optimizer.variables, state, self.config.keep_checkpoints)
        self.seconds["checkpoints"] += time.time() - t0
        logging.info("checkpoint %s (%.1fs)", path, time.time() - t0)
        return path

    def restore_or_start(self) -> dict:
        """The state to continue from: the newest usable checkpoint's, or a fresh one."""
        if self.worker.is_chief:
            checkpoints.remove_partial(self.ckpt_dir)
        ckpt = checkpoints.latest(self.ckpt_dir)
        if ckpt is None:
            return self._new_state()
        self._check_same_run(ckpt.state["config"], ckpt.path)
        rate, source = optim.peak_learning_rate(self.config)
        if ckpt.state.get("learning_rate", rate) != rate:
            then = optim.format_rate(ckpt.state["learning_rate"])
            raise FlagError(f"{ckpt.path} was trained at learning rate {then}, but this run's is "
                            f"{optim.format_rate(rate)} ({source}): kft's default changed since. Give "
                            f"--learning_rate={then} to resume it.")
        checkpoints.restore(ckpt, self.model.variables, self.optimizer.variables)
        state = {k: v for k, v in ckpt.state.items() if k not in ("model_variables", "optimizer_variables")}
        logging.info("resumed from %s: step %d, epoch %d, batch %d of %d", ckpt.path, state["step"],
                     state["epoch"] + 1, state["batch"], self.steps_per_epoch)
        return state

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, state: dict, summary_writer=None) -> dict:
        """Trains from `state` to the end (or early stop); returns the final state."""
        c = self.config
        log_every = c.log_every_steps or max(1, self.steps_per_epoch // 10)
        curve_every = max(1, self.total_steps // 200)
        progress = progress_lib.Progress(self.total_steps, state["step"])
        if self.step_hook is not None and state["epoch"] < c.epochs:
            self.step_hook(state["step"], True)
        with _SigtermFlag() as sigterm, progress:
            while state["epoch"] < c.epochs and not state["stopped_early"]:
                plan = self._plan(state["epoch"]).slice(state["batch"])
                examples, tokens = progress_lib.batch_counts(plan.indices, self.train.lengths)
                iterator = iter(distributed_dataset(self.strategy, plan, self.train))
                remaining = len(plan)
                while remaining:
                    to_ckpt = c.checkpoint_every_steps - state["step"] % c.checkpoint_every_steps \
                        if c.checkpoint_every_steps > 0 else remaining
                    n = max(1, min(c.steps_per_execution, remaining, to_ckpt))
                    t_chunk = time.time()
                    losses = self._train_chunk(iterator, tf.constant(n)).numpy()
                    self.seconds["steps"] += time.time() - t_chunk
                    if self.first_call_seconds is None:
                        self.first_call_seconds = time.time() - t_chunk
                    if self.step_hook is not None:
                        self.step_hook(state["step"] + n)
                    bad = np.flatnonzero(~np.isfinite(losses))
                    if bad.size:
                        self._diverged(state["step"] + int(bad[0]) + 1, float(losses[bad[0]]))
                    for i, loss in enumerate(losses):
                        self._record(state, float(loss), curve_every)
                        b, epoch = len(plan) - remaining + i, f"{state['epoch'] + 1}/{c.epochs}"
                        progress.update(state["step"], epoch, float(loss), int(examples[b]), int(tokens[b]))
                        if state["step"] % log_every == 0:
                            self._log_step(state, float(loss), progress.line(epoch, float(loss)),
                                           summary_writer)
                    remaining -= n
                    stop = sigterm.raised
                    if self.worker.count > 1:
                        stop = int(self._any_worker(tf.constant(int(stop))).numpy()) > 0
                    if stop:
                        raise Preempted(state["step"], self._save(state), sigterm.by)
                    if remaining and c.checkpoint_every_steps > 0 \
                            and state["step"] % c.checkpoint_every_steps == 0:
                        self._save(state)
                self._end_epoch(state, summary_writer)
                path = self._save(state)
                # A SIGTERM during the epoch-end evaluation or checkpoint: stop here, all saved (after
                # the last epoch too, or it would go unanswered through the final evaluation).
                stop = sigterm.raised
                if self.worker.count > 1:
                    stop = int(self._any_worker(tf.constant(int(stop))).numpy()) > 0
                if stop:
                    raise Preempted(state["step"], path, sigterm.by)
        if c.early_stopping_patience > 0 and state["best_accuracy"] is not None:
            best = checkpoints.latest(self.best_dir)
            if best is not None:
                checkpoints.restore(best, self.model.variables, [])
                self.eval_probabilities = None
                logging.info("restored the best weights: epoch %d, eval accuracy %.4f",
                             state["best_epoch"], state["best_accuracy"])
        return state

    @staticmethod
    def _record(state: dict, loss: float, curve_every: int) -> None:
        """Counts one finished step; the loss curve keeps means over windows of `curve_every`."""
        state["step"] += 1
        state["batch"] += 1
        state["epoch_loss_sum"] += loss
        state["epoch_loss_count"] += 1
        state["window"][0] += loss
        state["window"][1] += 1
        if state["step"] % curve_every == 0:
            state["curve_steps"].append(state["step"])
            state["curve_losses"].append(state["window"][0] / state["window"][1])
            state["window"] = [0.0, 0]

    def _log_step(self, state: dict, loss: float, line: str, summary_writer) -> None:
        logging.info("%s", line)
        if summary_writer is not None:
            with summary_writer.as_default(step=state["step"]):
                tf.summary.scalar("train/loss", loss)
                tf.summary.scalar("train/learning_rate", float(self.optimizer.learning_rate))

    def _diverged(self, step: int, value: float) -> None:
        steps = checkpoints.list_steps(self.ckpt_dir)
        last = checkpoints.path_for(self.ckpt_dir, steps[-1]) if steps else "none written yet"
        raise Diverged(f"training loss became {value} at step {step}; stopped without saving or "
                       f"exporting. Last good checkpoint: {last}. Lower --learning_rate or check "
                       "--clipnorm.")

    def _end_epoch(self, state: dict, summary_writer) -> None:
        c = self.config
        t0 = time.time()
        logging.info("epoch %d/%d: evaluating %s eval examples ...", state["epoch"] + 1, c.epochs,
                     f"{len(self.eval.lengths):,}")
        probabilities = self.eval_probabilities = self.predict(self.eval)
        self.seconds["eval"] += time.time() - t0
        result = self.evaluate_fn(probabilities)
        entry = {"epoch": state["epoch"] + 1, "step": state["step"],
                 "loss": state["epoch_loss_sum"] / max(1, state["epoch_loss_count"]),
                 "val_loss": result["loss"], "val_accuracy": result["accuracy"]}
        state["history"].append(entry)
        logging.info("epoch %d/%d done at step %d: train loss %.4f, eval loss %.4f, eval accuracy %.4f "
                     "(evaluated in %s)", entry["epoch"], c.epochs, entry["step"], entry["loss"],
                     entry["val_loss"], entry["val_accuracy"], progress_lib.duration(time.time() - t0))
        if summary_writer is not None:
            with summary_writer.as_default(step=state["step"]):
                tf.summary.scalar("eval/loss", entry["val_loss"])
                tf.summary.scalar("eval/accuracy", entry["val_accuracy"])
        score = result.get("score", entry["val_accuracy"])  # e.g. minus the eval loss for language models
        if state["best_accuracy"] is None or score > state["best_accuracy"]:
            state.update(best_accuracy=score, best_epoch=entry["epoch"],
                         epochs_without_gain=0)
            if self.worker.is_chief:
                checkpoints.save(self.best_dir, state["step"], self.model.variables, [],
                                 {"epoch": entry["epoch"], "val_accuracy": entry["val_accuracy"]}, keep=1)
        else:
            state["epochs_without_gain"] += 1
            if 0 < c.early_stopping_patience <= state["epochs_without_gain"]:
                logging.info("early stopping: no eval accuracy gain for %d epoch(s)",
                             state["epochs_without_gain"])
                state["stopped_early"] = True
        state.update(epoch=state["epoch"] + 1, batch=0, epoch_loss_sum=0.0, epoch_loss_count=0)
        if self.epoch_hook is not None:
            self.epoch_hook(entry["epoch"], score, result)


def in_split_order(split: Split, plan: inputs.BatchPlan, batches) -> np.ndarray:
    """Each batch's outputs (an iterable, one array per row of plan.indices) put back in the split's
    order: [n, k], or [n, longest, k] for per-position outputs (zero beyond each batch's width)."""
    out = None
    for rows, values in zip(plan.indices, batches):
        if out is None:
            shape = (len(split.lengths),) + ((int(split.lengths.max()),) if values.ndim == 3 else ()) \
                + values.shape[-1:]
            out = np.zeros(shape, values.dtype)
        keep = rows >= 0
        if values.ndim == 3:
            out[rows[keep], :values.shape[1]] = values[keep]
        else:
            out[rows[keep]] = values[keep]
    return out


def eval_batch_size(config: Config) -> int:
    """Forward passes keep no activations for a backward pass: bigger batches use the hardware better."""
    return config.eval_batch_size or 4 * config.batch_size


def mean_cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))) if len(labels) else math.nan
