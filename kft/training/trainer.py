"""`train_and_evaluate`: flags checked -> data, backbone, model -> fit -> final evaluation -> metrics ->
SavedModel. Each stage lives in its own module (validation, assembly, loop, final_evaluation,
run_metrics, artifacts); this one runs them in order."""

from __future__ import annotations

import dataclasses
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft import methods
from kft.config import Config, FlagError, to_dict  # noqa: F401  (FlagError: callers name it through here)
from kft.training import artifacts
from kft.training import assembly
from kft.training import distribute
from kft.training import final_evaluation
from kft.training import loop as loop_lib
from kft.training import optim
from kft.training import run_metrics
from kft.training import validation
from kft.training.train_state import TrainState


# Fewer training steps than this get a warning: 72 CSV rows at the default batch size and one epoch
# (3 steps) scored at chance in a newcomer's first run.
FEW_STEPS = 30


def default_run_name(config: Config) -> str:
    if config.run_name:
        return config.run_name
    if config.dataset:
        return re.sub(r"[^\w.-]+", "_", config.dataset)
    stem = os.path.splitext(os.path.basename(config.train_file))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(config.train_file)))
    return parent if stem in ("train", "training") and parent else stem


def default_model_dir(config: Config) -> str:
    return config.model_dir or os.path.join("runs", default_run_name(config))


@dataclasses.dataclass
class Trained:
    """What a finished (or resumed-to-completion) training run leaves in memory."""

    model: keras.Model
    metrics: dict
    train_lengths: np.ndarray | None = None  # tokens per training example (special tokens included)
    padded_tokens: int = 0  # positions computed in training, padding included (all epochs run)


def train_and_evaluate(config: Config, model_dir: str) -> dict:
    """Fine-tunes, evaluates and (optionally) exports; returns what metrics.json holds.

    Rerunning with the same `model_dir` continues from the newest usable checkpoint, at the exact
    step and batch where it was written; a finished run is evaluated (and exported) again.
    """
    return fit_model(config, model_dir).metrics


def fit_model(config: Config, model_dir: str, epoch_hook=None) -> Trained:
    """`train_and_evaluate`, also returning the trained model (for tests and notebooks).

    `epoch_hook(epoch, score, scores)` is called after each epoch-end evaluation (Loop.epoch_hook); an
    exception it raises ends the run (kft.tune prunes trials that way).
    """
    # The dtype policy is global in Keras: set for this run's layers, restored afterwards.
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.precision)
    try:
        with loop_lib.sigterm_scope():  # _fit_model replaces the SIGTERM handler once training is saved
            return _fit_model(config, model_dir, epoch_hook)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _fit_model(config: Config, model_dir: str, epoch_hook=None) -> Trained:
    """The run's stages in order: checks, assembly, training, final evaluation, metrics, artifacts."""
    started = time.time()
    validation.check_flags(config)  # before the strategy, data and backbone: a refused flag costs nothing
    rate, rate_source = optim.peak_learning_rate(config)
    logging.info("learning rate %s (%s)", optim.format_rate(rate), rate_source)
    # The strategy first: multi-worker and TPU strategies must configure TF before it runs anything.
    strategy = distribute.get_strategy(config.strategy, config.tpu)
    validation.check_replicas(config, strategy.num_replicas_in_sync)
    tf.io.gfile.makedirs(model_dir)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    worker = distribute.worker_info(strategy)
    a = assembly.assemble(config, model_dir, strategy, worker.is_chief)
    a.loop.epoch_hook = epoch_hook
    _log_plan(config, a, rate, worker, strategy.num_replicas_in_sync)

    resumed_at, state, train_seconds = _train(a.loop, model_dir, worker.is_chief)
    # The loop has checkpointed the finished training: from here a SIGTERM stops the run at once
    # (exit 75), and rerunning the command evaluates and exports without training again.
    stop = loop_lib.StopOnSigterm(a.loop.ckpt_dir, state["step"])
    results, eval_seconds = final_evaluation.evaluate_splits(a.loop, a.prep, a.model, stop)
    drift_info = final_evaluation.measure_drift(a.start, a.loaded, config, a.model)
    pruning_info = final_evaluation.pruning_report(a.pruner, config)
    stop.phase = "the writing of charts and the adapter"

    training = run_metrics.training(
        state, resumed_at_step=resumed_at, steps_per_epoch=a.loop.steps_per_epoch,
        examples_per_step=_examples_per_step(config, a), global_batch_size=config.batch_size,
        replicas=strategy.num_replicas_in_sync, workers=worker.count, train_function_traces=a.loop.trace_count,
        static_shapes=a.static, jit_compile=a.jit, train_seconds=train_seconds, tokenize_seconds=a.prep.seconds,
        seconds_split=a.loop.seconds, first_call_seconds=a.loop.first_call_seconds, eval_seconds=eval_seconds,
        class_weights=a.prep.class_weight, learning_rate=rate, learning_rate_source=rate_source)
    total, trainable = assembly.parameter_counts(a.model)
    metrics = run_metrics.metrics(
        run_name=default_run_name(config), task=config.task,
        backbone={"spec": config.backbone, "source": a.loaded.source, "kind": a.loaded.kind,
                  "layers": a.loaded.num_layers},
        method=a.method_info, adapter_loaded=a.adapter_in, student=a.student_info, distillation=a.distill_info,
        pruning=pruning_info, drift=drift_info, total_parameters=total, trainable_parameters=trainable,
        sequence_length=a.prep.sequence_length, description=a.prep.description, labels=a.prep.names,
        data_stats=a.prep.stats, training=training, results=results, config=to_dict(config))
    _write_artifacts(config, a, strategy, worker.is_chief, state, results, drift_info, metrics, rate, stop,
                     model_dir)
    stop.phase = "the writing of metrics.json"
    metrics["training"]["total_seconds"] = round(time.time() - started, 2)
    if worker.is_chief:
        artifacts.write_metrics(metrics, model_dir)
    padded = sum(int(np.sum(a.loop.plan(e).widths)) * config.batch_size for e in range(len(state["history"])))
    return Trained(a.model, metrics, a.prep.train_lengths, padded)


def _log_plan(config: Config, a: assembly.Assembly, rate: float, worker, replicas: int) -> None:
    """Logs the model's size and the step plan; warns when the run is too short to learn much."""
    total, trainable = assembly.parameter_counts(a.model)
    logging.info("parameters: %d total, %d trainable (%.3g%%); method %s", total, trainable,
                 100.0 * trainable / total, a.method_info)
    logging.info("batch size %d global = %d per replica x %d replicas (learning rate %s, independent "
                 "of the replica count); %d steps/epoch, %d epochs; worker %d of %d",
                 config.batch_size, config.batch_size // replicas, replicas, optim.format_rate(rate),
                 a.loop.steps_per_epoch, config.epochs, worker.index, worker.count)
    if 0 < a.loop.total_steps < FEW_STEPS:
        logging.warning("only %d training steps (%d training examples, --batch_size=%d, --epochs=%d): a "
                        "model fine-tuned this briefly often stays near chance; with little data, raise "
                        "--epochs (or lower --batch_size)", a.loop.total_steps, _train_examples(a),
                        config.batch_size, config.epochs)


def _train_examples(a: assembly.Assembly) -> int:
    """Training examples per epoch (with --pack_sequences a row holds several)."""
    train = a.prep.sources["train"]
    return len(a.prep.train_lengths) if train.segments is not None else len(train.lengths)


def _examples_per_step(config: Config, a: assembly.Assembly) -> float:
    """The global batch; packed rows hold several examples: an epoch's examples over its steps."""
    if a.prep.sources["train"].segments is None:
        return config.batch_size
    return _train_examples(a) / max(1, a.loop.steps_per_epoch)


def _train(loop: loop_lib.Loop, model_dir: str, is_chief: bool) -> tuple[int, TrainState, float]:
    """Resumes (or starts) and trains to the end: (the step this process began at, the final
    state, this process's training seconds)."""
    state = loop.restore_or_start()
    resumed_at = state["step"]
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "logs")) if is_chief else None
    t0 = time.time()
    state = loop.run(state, writer)
    train_seconds = time.time() - t0
    if writer is not None:
        writer.flush()
    return resumed_at, state, train_seconds


def _write_artifacts(config: Config, a: assembly.Assembly, strategy, is_chief: bool, state: TrainState,
                     results: dict, drift_info: dict | None, metrics: dict, rate: float, stop,
                     model_dir: str) -> None:
    """Charts, the adapter, the export and the quantized copy; records their paths in `metrics`."""
    run_name = metrics["run_name"]
    if is_chief:
        artifacts.write_reports(state, a.prep, results, drift_info, model_dir, run_name)
    if a.method_info["method"] != "full" and is_chief:  # full fine-tuning: the export is the artifact
        metrics["adapter"] = artifacts.save_adapter(a.model, config, model_dir, a.prep.names, a.loaded.source)
    exported = False
    if config.export and is_chief:
        artifacts.export(a, config, metrics, results, rate, run_name, stop)
        exported = True
    if config.quantize != "none":
        stop.phase = "quantization"
        if not exported:
            methods.prepare_export(a.loaded.backbone, config)  # LoRA merged before its kernels are quantized
        metrics["quantization"] = artifacts.quantize(a, config, strategy, results, metrics, run_name, is_chief)
