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

from kft import methods
from kft.models import adapters
from kft.models import backbones
from kft.training import distribute
from kft.data import inputs
from kft.training import optim
from kft.reporting import plots
from kft.training import progress
from kft.training import recompute
from kft.training import drift as drift_lib
from kft.compression import distillation, pruning, students
from kft.training import task_api
from kft.training import loop as loop_lib
from kft import config as config_lib
from kft.config import Config, FlagError, to_dict


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


def _use_jit(config: Config) -> bool:
    if config.jit_compile == "auto":
        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return config.jit_compile == "true"


def _quantize(model, loop, sources, prep, float_results, config: Config, strategy, metrics: dict,
              run_name: str, loaded, is_chief: bool, data) -> dict:
    """Quantizes the trained model, scores it on the eval split beside float32, and exports it as
    <run_name>_<mode> (the float32 export stays where it was)."""
    from kft.models import savedmodel as export_lib
    from kft.compression import quantization

    t0 = time.time()
    with strategy.scope():
        info = quantization.quantize(model, config.quantize)
    loop.refresh_predict_function()  # the traced one captured the float32 kernels
    outputs = loop.predict(sources["eval"])
    quantized = prep.evaluate("eval", outputs, model)
    headline = [m for m in prep.headline if m in quantized]
    info["eval"] = {m: quantized[m] for m in headline}
    info["float32_eval"] = {m: float_results["eval"][m] for m in headline}
    info["seconds"] = round(time.time() - t0, 2)
    logging.info("quantized to %s (%s): weights %.1f MB (float32 %.1f MB); eval %s (float32 %s)",
                 config.quantize, ", ".join(f"{n} {k}" for k, n in info["quantized_layers"].items()),
                 info["weight_bytes"] / 1e6, info["float32_weight_bytes"] / 1e6,
                 ", ".join(f"{m} {info['eval'][m]:.4f}" for m in headline),
                 ", ".join(f"{m} {info['float32_eval'][m]:.4f}" for m in headline))
    if config.export and is_chief:
        metadata = {k: metrics[k] for k in ("run_name", "task", "backbone", "method", "parameters")}
        metadata.update(data=prep.description, flags=to_dict(config), quantization=config.quantize,
                        metrics={"eval": info["eval"]})
        info["export"] = task_api.get(config.task).export(model, loaded, prep, config, f"{run_name}_{config.quantize}",
                                             metadata)
        info["export_variables_bytes"] = export_lib.variables_bytes(info["export"])
        if metrics.get("export"):
            info["float32_export_variables_bytes"] = export_lib.variables_bytes(metrics["export"])
        logging.info("quantized export: %s (%.1f MB of variables)", info["export"],
                     info["export_variables_bytes"] / 1e6)
        texts = _serving_texts(data, config)
        if texts and metrics.get("export"):
            info["serving"] = {"float32": quantization.serving_latency(metrics["export"], texts),
                               config.quantize: quantization.serving_latency(info["export"], texts)}
            for name, timing in info["serving"].items():
                logging.info("serving %s export (this process, eval texts): batch 1 p50 %.1f ms, p99 %.1f ms; "
                             "batch 64 %.0f texts/s", name, timing["batch_1_p50_ms"], timing["batch_1_p99_ms"],
                             timing["batch_64_texts_per_second"])
    return info


def _serving_texts(data, config: Config) -> list[str]:
    """Eval texts as a client sends them (question answering's exports take pairs: not timed here)."""
    if config.task == "classification":
        return list(data.eval.texts[:512])
    if config.task == "token_classification":
        return [" ".join(words) for words in data.eval.words[:512]]
    return []


def _vocabulary(tokenizer) -> list[str] | None:
    try:
        return list(tokenizer.get_vocabulary())
    except (AttributeError, NotImplementedError, ValueError):
        return None


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

    `epoch_hook(epoch, score)` is called after each epoch-end evaluation (Loop.epoch_hook); an
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
    started = time.time()
    config_lib.check_task_flags(config)  # before the strategy: a mistyped run fails at once
    rate, rate_source = optim.peak_learning_rate(config)  # a negative --learning_rate fails here
    logging.info("learning rate %s (%s)", optim.format_rate(rate), rate_source)
    # The strategy first: multi-worker and TPU strategies must configure TF before it runs anything.
    strategy = distribute.get_strategy(config.strategy, config.tpu)
    tf.io.gfile.makedirs(model_dir)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    task = task_api.get(config.task)
    worker = distribute.worker_info(strategy)
    replicas = strategy.num_replicas_in_sync
    if loop_lib.eval_batch_size(config) % replicas:
        raise FlagError(f"--eval_batch_size={loop_lib.eval_batch_size(config)} must divide evenly over "
                        f"{replicas} replicas")
    if config.batch_size % replicas:
        raise FlagError(f"--batch_size={config.batch_size} is the global batch and must divide evenly "
                        f"over {replicas} replicas")
    run_name = default_run_name(config)

    distillation.check_flags(config)
    teacher = distillation.load_teacher(config.teacher, config) if config.teacher else None
    data = task.load_data(config)
    with strategy.scope():
        if teacher is not None and config.student_layers:
            if config.backbone not in (config_lib.BUNDLED_BACKBONE, teacher.config.backbone):
                raise FlagError(f"--student_layers with --teacher copies the teacher's backbone "
                                f"({teacher.config.backbone}); --backbone={config.backbone} contradicts it")
            loaded = dataclasses.replace(teacher.loaded)
        else:
            loaded = (task.load_backbone(config) if hasattr(task, "load_backbone")
                      else backbones.load(config.backbone))
        student_info = None
        if config.student_layers:
            if teacher is not None and teacher.config.method in ("prompt", "prefix"):
                raise FlagError(f"--student_layers: the teacher was trained with --method="
                                f"{teacher.config.method}, whose blocks cannot be copied one by one")
            depth = loaded.num_layers
            loaded.backbone, chosen = students.shallow_copy(loaded.backbone, config.student_layers)
            student_info = {"layers": config.student_layers, "of": depth, "copied_layers": chosen,
                            "from": "teacher" if teacher is not None else "pretrained backbone"}
            logging.info("student: %d of %d transformer layers (%s), copied from the %s",
                         config.student_layers, depth, chosen, student_info["from"])
    logging.info("backbone: %s (%s), %d transformer layers", loaded.source, loaded.kind,
                 loaded.num_layers)
    # theta_0 before the method changes the backbone and before a checkpoint is restored
    start = drift_lib.snapshot(loaded, representations=config.drift,
                               scorer=getattr(task, "perplexity_scorer", None)) \
        if (config.drift or config.regularize_to_pretrained != "none") else None
    prep = task.prepare(config, data, loaded, model_dir, worker.is_chief)
    sources = prep.sources
    if teacher is not None:
        distillation.check_labels(teacher, prep.names)

    if hasattr(task, "check_method"):
        task.check_method(loaded.backbone, config)
    with strategy.scope():
        backbone, method_info = methods.apply(loaded.backbone, config, _vocabulary(loaded.tokenizer))
        model = task.build(backbone, prep.names, config)
    if config.gradient_checkpointing:
        logging.info("gradient checkpointing: %d transformer blocks recomputed in the backward pass",
                     recompute.enable(backbone))
    prep.model = model
    if teacher is not None and config.student_layers:
        copied = students.copy_head(teacher.model, model)
        logging.info("student head: copied %s from the teacher", copied)
    distill_info = None
    if teacher is not None:
        distill_info = {"teacher": teacher.path, "teacher_checkpoint": teacher.checkpoint,
                        "alpha": config.distill_alpha, "temperature": config.distill_temperature}
        if config.distill_alpha > 0:
            t0 = time.time()
            train_source = distillation.teacher_source(teacher, config, sources["train"], data, loaded)
            sources["train"] = dataclasses.replace(sources["train"], targets=distillation.teacher_outputs(
                teacher, train_source, config, model_dir))
            distill_info["teacher_seconds"] = round(time.time() - t0, 2)
        else:
            logging.info("--distill_alpha=0: the task loss alone (teacher outputs not needed)")
    adapter_in = adapters.load(model, config, config.adapter, prep.names) if config.adapter else None

    jit = _use_jit(config)
    # XLA (TPU, or --jit_compile) compiles one program per input shape: give it one per bucket.
    static = distribute.uses_static_shapes(strategy) or jit
    steps_per_epoch = len(inputs.train_plan(sources["train"].lengths, config.batch_size,
                                            loop_lib.train_buckets(sources["train"], config), config.seed, 0,
                                            static))
    with strategy.scope():
        optimizer = optim.build_optimizer(config, steps_per_epoch * config.epochs)
        if config.regularize_to_pretrained == "l2sp":
            anchored = optimizer.anchor(drift_lib.anchors(start, loaded.backbone), config.l2sp_weight)
            logging.info("L2-SP: %d backbone tensors decay toward their starting values (weight %g); the "
                         "head and the method's own weights decay toward 0", anchored, config.l2sp_weight)
        elif config.l2sp_weight != config_lib.Config().l2sp_weight:
            raise FlagError("--l2sp_weight applies with --regularize_to_pretrained=l2sp only")
        loss_fn = task.loss_function(model, prep.class_weight)
        if sources["train"].targets is not None:
            loss_fn = distillation.loss_function(loss_fn, config.distill_alpha, config.distill_temperature,
                                                 per_position=sources["train"].targets.ndim == 3)
        loop = loop_lib.Loop(model, optimizer, loss_fn, strategy, config, model_dir,
                             sources["train"], sources["eval"], prep.epoch_eval, static, jit,
                             prep.predict_function(model) if prep.predict_function else None)
    pruner = None
    if config.prune_sparsity:
        if config.method != "full":
            raise FlagError(f"--prune_sparsity prunes the kernels as they train: it needs --method=full, "
                            f"not --method={config.method}")
        with strategy.scope():
            pruner = pruning.Pruner(backbone, config.prune_sparsity, loop.total_steps, config.prune_end_fraction)
        loop.step_hook = pruner.update
    elif config.prune_end_fraction != config_lib.Config().prune_end_fraction:
        raise FlagError("--prune_end_fraction applies with --prune_sparsity only")
    loop.epoch_hook = epoch_hook
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    logging.info("parameters: %d total, %d trainable (%.3g%%); method %s", total, trainable,
                 100.0 * trainable / total, method_info)
    logging.info("batch size %d global = %d per replica x %d replicas (learning rate %s, independent "
                 "of the replica count); %d steps/epoch, %d epochs; worker %d of %d",
                 config.batch_size, config.batch_size // replicas, replicas, optim.format_rate(rate),
                 loop.steps_per_epoch, config.epochs, worker.index, worker.count)
    packed = sources["train"].segments is not None  # rows of several examples (--pack_sequences)
    train_examples = len(prep.train_lengths) if packed else len(sources["train"].lengths)
    if 0 < loop.total_steps < FEW_STEPS:
        logging.warning("only %d training steps (%d training examples, --batch_size=%d, --epochs=%d): a "
                        "model fine-tuned this briefly often stays near chance; with little data, raise "
                        "--epochs (or lower --batch_size)", loop.total_steps, train_examples,
                        config.batch_size, config.epochs)

    state = loop.restore_or_start()
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "logs")) if worker.is_chief else None
    t0 = time.time()
    state = loop.run(state, writer)
    train_seconds = time.time() - t0
    if writer is not None:
        writer.flush()
    # The loop has checkpointed the finished training: from here a SIGTERM stops the run at once
    # (exit 75), and rerunning the command evaluates and exports without training again.
    stop = loop_lib.StopOnSigterm(loop.ckpt_dir, state["step"])

    t0 = time.time()
    results = {}
    for k, source in sources.items():
        if k == "train":
            continue
        t_split = time.time()
        reuse = k == "eval" and loop.eval_probabilities is not None
        if reuse:
            logging.info("eval: scoring the last epoch-end predictions (the same weights; not recomputed)")
        else:
            stop.phase = f"the final evaluation ({k})"
            logging.info("evaluating %s %s examples ...", f"{len(source.lengths):,}", k)
        outputs = loop.eval_probabilities if reuse else loop.predict(source)
        results[k] = prep.evaluate(k, outputs, model)
        logging.info("%s metrics (%s):\n%s", k, progress.duration(time.time() - t_split),
                     prep.format(results[k]))
    eval_seconds = time.time() - t0
    drift_info = None
    if config.drift:
        t_drift = time.time()
        drift_info = drift_lib.measure(start, loaded, config, model)
        logging.info("drift from the start (%.1fs): weight distance %.4f overall, per layer %s; linear CKA "
                     "per layer %s%s (general text)", time.time() - t_drift, drift_info["weights"]["overall"],
                     drift_info["weights"]["per_layer"], (drift_info.get("representations") or {}).get("per_layer"),
                     drift_lib.perplexity_summary(drift_info))
    pruning_info = pruner.report() if pruner is not None else None
    if pruning_info:
        logging.info("pruning: %.2f%% of %d projection weights are 0 (target %.2f%%)",
                     100 * pruning_info["measured"], pruning_info["pruned_parameters"], 100 * config.prune_sparsity)
    stop.phase = "the writing of charts and the adapter"

    epochs_now = len(state["history"])
    metrics = {
        "run_name": run_name,
        "task": config.task,
        "backbone": {"spec": config.backbone, "source": loaded.source, "kind": loaded.kind,
                     "layers": loaded.num_layers},
        "method": method_info,
        "adapter_loaded": adapter_in,
        "student": student_info,
        "distillation": distill_info,
        "pruning": pruning_info,
        "drift": drift_info,
        "parameters": {"total": total, "trainable": trainable,
                       "trainable_percent": round(100.0 * trainable / total, 4)},
        "sequence_length": prep.sequence_length,
        "data": {"description": prep.description, "labels": prep.names, **prep.stats},
        "training": {
            "epochs_run": epochs_now, "steps": state["step"], "steps_per_epoch": loop.steps_per_epoch,
            "global_batch_size": config.batch_size, "replicas": replicas, "workers": worker.count,
            "stopped_early": state["stopped_early"], "train_function_traces": loop.trace_count,
            "static_shapes": static, "jit_compile": jit,
            "train_seconds": round(train_seconds, 2), "tokenize_seconds": round(prep.seconds, 2),
            # train_seconds split: steps, epoch-end evaluations, checkpoint writes (this process)
            "train_seconds_split": {k: round(v, 2) for k, v in loop.seconds.items()},
            "first_call_seconds": loop.first_call_seconds and round(loop.first_call_seconds, 2),
            "eval_seconds": round(eval_seconds, 2), "class_weights": prep.class_weight,
            "learning_rate": rate, "learning_rate_source": rate_source,
            "examples_per_second": round(
                (train_examples if packed else loop.steps_per_epoch * config.batch_size) * epochs_now
                / max(train_seconds, 1e-9), 2),
            "history": state["history"],
        },
        **results,
        "config": to_dict(config),
    }
    if worker.is_chief:
        plots.training_curves(state["curve_steps"], state["curve_losses"], state["history"],
                              os.path.join(model_dir, "training_curves.png"))
        prep.write_outputs(results, model_dir)
        if drift_info:
            plots.drift(drift_info, os.path.join(model_dir, "drift.png"), run_name)

    if method_info["method"] != "full" and worker.is_chief:  # full fine-tuning: the export is the artifact
        metrics["adapter"] = adapters.save(model, config, os.path.join(model_dir, adapters.FILENAME),
                                           prep.names, loaded.source)
        logging.info("adapter: %d trainable tensors (%d parameters, %.1f MB) saved to %s",
                     metrics["adapter"]["tensors"], metrics["adapter"]["parameters"],
                     metrics["adapter"]["bytes"] / 1e6, metrics["adapter"]["path"])
    exported = False
    if config.export and worker.is_chief:
        metadata = {k: metrics[k] for k in ("run_name", "task", "backbone", "method", "parameters")}
        metadata.update(data=prep.description, flags=to_dict(config), learning_rate=rate,
                        metrics={k: {m: results[k][m] for m in prep.headline if m in results[k]} for k in results})
        t0 = time.time()
        stop.phase = "the export"
        logging.info("exporting SavedModel to %s ...", os.path.join(config.export_dir, run_name))
        methods.prepare_export(loaded.backbone, config)
        exported = True
        metrics["export"] = task.export(model, loaded, prep, config, run_name, metadata)
        metrics["training"]["export_seconds"] = round(time.time() - t0, 2)
        logging.info("export done in %s: %s", progress.duration(time.time() - t0), metrics["export"])
    if config.quantize != "none":
        stop.phase = "quantization"
        if not exported:
            methods.prepare_export(loaded.backbone, config)  # LoRA merged before its kernels are quantized
        metrics["quantization"] = _quantize(model, loop, sources, prep, results, config, strategy,
                                            metrics, run_name, loaded, worker.is_chief, data)
    stop.phase = "the writing of metrics.json"
    metrics["training"]["total_seconds"] = round(time.time() - started, 2)
    if worker.is_chief:
        path = os.path.join(model_dir, "metrics.json")
        with tf.io.gfile.GFile(path + ".tmp", "w") as f:  # renamed when complete: never half-written
            json.dump(metrics, f, indent=2, default=str)
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    padded = sum(int(np.sum(plan.widths)) * config.batch_size
                 for plan in (loop._plan(e) for e in range(epochs_now)))
    return Trained(model, metrics, prep.train_lengths, padded)
