"""`train_and_evaluate`: data -> backbone -> model -> fit -> metrics -> SavedModel."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft import backbones, data as data_lib, distribute, export, inputs, methods, optim, plots, tasks
from kft.config import Config, FlagError, to_dict
from kft.metrics import format_report


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


class _StepLog(keras.callbacks.Callback):
    """Train loss averaged over windows of `every` steps, and eval metrics per epoch, for the curves.

    Keras reports the running mean of the epoch's loss; the mean over steps (a, b] of the same
    epoch is (b * mean_b - a * mean_a) / (b - a), which shows the loss of that window itself.
    """

    def __init__(self, every: int):
        super().__init__()
        self.every = max(1, every)
        self.steps, self.losses, self.epochs = [], [], []
        self._epoch_start = 0
        self._last = (0, 0.0)  # (batches seen in this epoch, their running mean loss)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = int(self.model.optimizer.iterations.numpy())
        self._last = (0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        seen = batch + 1
        if logs and "loss" in logs and seen % self.every == 0:
            mean = float(logs["loss"])
            a, mean_a = self._last
            self.steps.append(self._epoch_start + seen)
            self.losses.append((seen * mean - a * mean_a) / (seen - a))
            self._last = (seen, mean)

    def on_epoch_end(self, epoch, logs=None):
        entry = {"epoch": epoch + 1, "step": int(self.model.optimizer.iterations.numpy())}
        entry.update({k: float(v) for k, v in (logs or {}).items()})
        self.epochs.append(entry)


def _split_stats(split: data_lib.Split, encoded: inputs.Encoded, ids: np.ndarray,
                 vocab: data_lib.LabelVocab) -> dict:
    return {
        "source": split.source,
        "examples": len(split),
        "labels": data_lib.label_distribution(ids, vocab),
        "truncated": encoded.truncated,
        "mean_tokens": round(float(encoded.lengths.mean()), 2),
        "max_tokens": int(encoded.lengths.max()),
    }


def _predict(model: keras.Model, encoded: inputs.Encoded, batch_size: int, pad: int) -> np.ndarray:
    ds, order = inputs.sorted_dataset(encoded, None, batch_size, pad)
    return inputs.unsort(model.predict(ds, verbose=0), order)


def _use_jit(config: Config) -> bool:
    if config.jit_compile == "auto":
        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return config.jit_compile == "true"


@dataclasses.dataclass
class _Inputs:
    """Every split tokenized once, with its class ids and statistics."""

    sequence_length: int
    splits: dict  # name -> data.Split
    encoded: dict  # name -> inputs.Encoded
    label_ids: dict  # name -> np.ndarray
    stats: dict
    seconds: float


def _prepare_inputs(config: Config, data: data_lib.Data, loaded: backbones.Loaded) -> _Inputs:
    t0 = time.time()
    raw_lengths = inputs.raw_token_lengths(loaded.tokenizer, data.train.texts)
    sequence_length = config.sequence_length or inputs.choose_sequence_length(
        raw_lengths, loaded.packing, loaded.max_sequence_length)
    if sequence_length > loaded.max_sequence_length:
        raise FlagError(f"--sequence_length={sequence_length} exceeds the backbone's limit of "
                        f"{loaded.max_sequence_length} positions")
    splits = {"train": data.train, "eval": data.eval}
    if data.test is not None:
        splits["test"] = data.test
    encoded = {k: inputs.encode(loaded.tokenizer, loaded.packing, s.texts, sequence_length)
               for k, s in splits.items()}
    label_ids = {k: data.vocab.encode(s, config.label_field) for k, s in splits.items()}
    stats = {k: _split_stats(splits[k], encoded[k], label_ids[k], data.vocab) for k in splits}
    prepared = _Inputs(sequence_length, splits, encoded, label_ids, stats, time.time() - t0)
    logging.info("data: %s; sequence_length=%d (%s); tokenized in %.1fs", data.description,
                 sequence_length, "given" if config.sequence_length else "99th percentile of train",
                 prepared.seconds)
    for k, st in stats.items():
        logging.info("  %s: %d examples, labels %s, %d truncated to %d tokens, mean %.1f tokens",
                     k, st["examples"], st["labels"], st["truncated"], sequence_length, st["mean_tokens"])
    return prepared


def _callbacks(config: Config, model_dir: str, steps_per_epoch: int, step_log: _StepLog) -> list:
    backup = os.path.join(model_dir, "backup")
    marker = os.path.join(backup, "training_metadata.json")
    if tf.io.gfile.exists(marker):
        with tf.io.gfile.GFile(marker) as f:
            logging.info("resuming from %s: %d epoch(s) already done", backup, json.load(f)["epoch"])
    callbacks = [
        keras.callbacks.BackupAndRestore(backup),
        keras.callbacks.ModelCheckpoint(os.path.join(model_dir, "best.weights.h5"), monitor="val_accuracy",
                                        mode="max", save_best_only=True, save_weights_only=True),
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"),
                                    update_freq=max(1, steps_per_epoch // 20)),
        step_log,
    ]
    if config.early_stopping_patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=config.early_stopping_patience,
            restore_best_weights=True, verbose=1))
    return callbacks


def train_and_evaluate(config: Config, model_dir: str) -> dict:
    """Fine-tunes, evaluates and (optionally) exports; returns what metrics.json holds.

    Rerunning with the same `model_dir` resumes from the last completed epoch.
    """
    started = time.time()
    tf.io.gfile.makedirs(model_dir)
    keras.utils.set_random_seed(config.seed)
    task = tasks.get(config.task)
    strategy = distribute.get_strategy(config.strategy, config.tpu)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise FlagError(f"--batch_size={config.batch_size} is the global batch and must divide evenly "
                        f"over {replicas} replicas")
    run_name = default_run_name(config)

    data = data_lib.load(config)
    vocab = data.vocab
    with strategy.scope():
        loaded = backbones.load(config.backbone)
    logging.info("backbone: %s (%s), %d transformer layers", loaded.source, loaded.kind,
                 loaded.num_layers)
    prep = _prepare_inputs(config, data, loaded)
    splits, encoded, label_ids, stats = prep.splits, prep.encoded, prep.label_ids, prep.stats
    sequence_length, tokenize_seconds = prep.sequence_length, prep.seconds

    static = distribute.uses_static_shapes(strategy)
    train_ds = inputs.train_dataset(encoded["train"], label_ids["train"], config.batch_size,
                                    config.seed, config.num_buckets, loaded.packing.pad, static)
    eval_ds, _ = inputs.sorted_dataset(encoded["eval"], label_ids["eval"], config.batch_size,
                                       loaded.packing.pad)
    steps_per_epoch = inputs.num_train_batches(encoded["train"], config.batch_size, config.num_buckets,
                                               static)
    total_steps = steps_per_epoch * config.epochs

    with strategy.scope():
        method_info = methods.apply(loaded.backbone, config)
        model = task.build_model(loaded.backbone, len(vocab), config.dropout, config.pooling, config.seed)
        model.compile(optimizer=optim.build_optimizer(config, total_steps), loss=task.loss(),
                      metrics=task.train_metrics(), jit_compile=_use_jit(config),
                      steps_per_execution=config.steps_per_execution)
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    logging.info("parameters: %d total, %d trainable (%.1f%%); method %s", total, trainable,
                 100.0 * trainable / total, method_info)
    logging.info("batch size %d global (%d per replica x %d replicas), %d steps/epoch, %d epochs",
                 config.batch_size, config.batch_size // replicas, replicas, steps_per_epoch, config.epochs)

    class_weight = None
    if config.class_weights == "balanced":
        class_weight = data_lib.balanced_class_weights(label_ids["train"], len(vocab))
        logging.info("class weights: %s", class_weight)

    step_log = _StepLog(every=max(1, total_steps // 200))
    callbacks = _callbacks(config, model_dir, steps_per_epoch, step_log)

    t0 = time.time()
    model.fit(train_ds, validation_data=eval_ds, epochs=config.epochs, class_weight=class_weight,
              shuffle=False, callbacks=callbacks, verbose=2 if os.environ.get("KFT_QUIET") else 1)
    train_seconds = time.time() - t0
    steps_done = int(model.optimizer.iterations.numpy())

    t0 = time.time()
    results = {}
    for k in splits:
        if k == "train":
            continue
        probabilities = _predict(model, encoded[k], config.batch_size, loaded.packing.pad)
        results[k] = task.evaluate(probabilities, label_ids[k], vocab.names)
        logging.info("%s metrics:\n%s", k, format_report(results[k], vocab.names))
    eval_seconds = time.time() - t0

    metrics = {
        "run_name": run_name,
        "task": config.task,
        "backbone": {"spec": config.backbone, "source": loaded.source, "kind": loaded.kind,
                     "layers": loaded.num_layers},
        "method": method_info,
        "parameters": {"total": total, "trainable": trainable,
                       "trainable_percent": round(100.0 * trainable / total, 4)},
        "sequence_length": sequence_length,
        "data": {"description": data.description, "labels": vocab.names, **stats},
        "training": {
            "epochs_run": len(step_log.epochs), "steps": steps_done, "steps_per_epoch": steps_per_epoch,
            "train_seconds": round(train_seconds, 2), "tokenize_seconds": round(tokenize_seconds, 2),
            "eval_seconds": round(eval_seconds, 2), "class_weights": class_weight,
            "examples_per_second": round(
                len(data.train) * len(step_log.epochs) / max(train_seconds, 1e-9), 2),
            "history": step_log.epochs,
        },
        **results,
        "config": to_dict(config),
    }
    plots.training_curves(step_log.steps, step_log.losses, step_log.epochs,
                          os.path.join(model_dir, "training_curves.png"))
    plots.confusion_matrix(results["eval"]["confusion_matrix"], vocab.names,
                           os.path.join(model_dir, "confusion_matrix.png"), f"eval: {data.eval.source}")
    with tf.io.gfile.GFile(os.path.join(model_dir, "labels.json"), "w") as f:
        json.dump(vocab.to_json(), f, indent=2)

    if config.export:
        metadata = {k: metrics[k] for k in ("run_name", "task", "backbone", "method", "parameters")}
        metadata.update(data=data.description, flags=to_dict(config),
                        metrics={k: {m: results[k][m] for m in ("accuracy", "macro_f1")} for k in results})
        metrics["export"] = export.export(model, loaded.tokenizer, loaded.packing, sequence_length, task,
                                          vocab.names, config.export_dir, run_name, metadata)
    metrics["training"]["total_seconds"] = round(time.time() - started, 2)
    with tf.io.gfile.GFile(os.path.join(model_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    return metrics

