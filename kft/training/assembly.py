"""Builds what a run trains: teacher, (student) backbone, tokenized data, model, optimizer and loop.

Called once the flags have passed kft.training.validation; the checks left here need what is
being built (the backbone's depth, the method the backbone can take, the teacher's labels).
"""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft import methods
from kft.compression import distillation, pruning, students
from kft.config import Config, FlagError
from kft.data import inputs
from kft.models import adapters
from kft.models import backbones
from kft.training import distribute
from kft.training import drift as drift_lib
from kft.training import loop as loop_lib
from kft.training import optim
from kft.training import recompute
from kft.models import attention
from kft.training import task_api


@dataclasses.dataclass
class Assembly:
    """A run ready for its first step, and what metrics.json reports about how it was built."""

    task: object  # the registered task module
    data: object  # the task's examples as read
    loaded: object  # backbones.Loaded: the backbone (the student's, if one) and its tokenizer
    prep: task_api.Prepared
    backbone: keras.Model  # the backbone with the method applied
    model: keras.Model
    loop: loop_lib.Loop
    method_info: dict
    start: object = None  # drift snapshot of the starting weights (--drift, --regularize_to_pretrained)
    student_info: dict | None = None
    distill_info: dict | None = None
    adapter_in: dict | None = None
    pruner: pruning.Pruner | None = None
    static: bool = False  # one input shape per length bucket (TPU, XLA)
    jit: bool = False


def use_jit(config: Config) -> bool:
    if config.jit_compile == "auto":
        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return config.jit_compile == "true"


def vocabulary(tokenizer) -> list[str] | None:
    try:
        return list(tokenizer.get_vocabulary())
    except (AttributeError, NotImplementedError, ValueError):
        return None


def assemble(config: Config, model_dir: str, strategy, is_chief: bool) -> Assembly:
    """Reads the data, loads the backbone (or the teacher's), builds the model and its loop."""
    task = task_api.get(config.task)
    teacher = distillation.load_teacher(config.teacher, config) if config.teacher else None
    data = task.load_data(config)
    loaded, student_info = _load_backbone(config, task, teacher, strategy)
    # theta_0 before the method changes the backbone and before a checkpoint is restored
    start = drift_lib.snapshot(loaded, representations=config.drift,
                               scorer=getattr(task, "perplexity_scorer", None)) \
        if (config.drift or config.regularize_to_pretrained != "none") else None
    prep = task.prepare(config, data, loaded, model_dir, is_chief)
    if teacher is not None:
        distillation.check_labels(teacher, prep.names)
    if hasattr(task, "check_method"):
        task.check_method(loaded.backbone, config)
    with strategy.scope():
        backbone, method_info = methods.apply(loaded.backbone, config, vocabulary(loaded.tokenizer))
        model = task.build(backbone, prep.names, config)
    if config.gradient_checkpointing:
        logging.info("gradient checkpointing: %d transformer blocks recomputed in the backward pass",
                     recompute.enable(backbone))
    method_info["attention"] = _attention(config, backbone)
    prep.model = model
    if teacher is not None and config.student_layers:
        copied = students.copy_head(teacher.model, model)
        logging.info("student head: copied %s from the teacher", copied)
    distill_info = _distill(config, teacher, prep, data, loaded, model_dir)
    adapter_in = adapters.load(model, config, config.adapter, prep.names) if config.adapter else None
    jit = use_jit(config)
    # XLA (TPU, or --jit_compile) compiles one program per input shape: give it one per bucket.
    static = distribute.uses_static_shapes(strategy) or jit
    loop = _build_loop(config, model_dir, strategy, task, prep, model, loaded, start, static, jit)
    pruner = None
    if config.prune_sparsity:
        with strategy.scope():
            pruner = pruning.Pruner(backbone, config.prune_sparsity, loop.total_steps, config.prune_end_fraction)
        loop.step_hook = pruner.update
    return Assembly(task, data, loaded, prep, backbone, model, loop, method_info, start, student_info,
                    distill_info, adapter_in, pruner, static, jit)


def _attention(config: Config, backbone) -> str:
    """Switches llama-family attention to the memory-efficient kernel unless --attention=standard;
    returns what the blocks use (for the log and metrics.json)."""
    if config.attention == "standard":
        return "standard"
    switched = attention.use_memory_efficient_attention(backbone)
    if not switched:
        if config.attention == "memory_efficient":
            raise FlagError(f"--attention=memory_efficient: {type(backbone).__name__} has no llama-family "
                            "attention layers to switch")
        return "standard"
    logging.info("attention: memory-efficient (blockwise, no [length x length] scores kept) in %d blocks",
                 switched)
    return f"memory_efficient ({switched} blocks)"


def _load_backbone(config: Config, task, teacher, strategy) -> tuple[object, dict | None]:
    """The backbone to train (a copy of the teacher's with --student_layers) and the student report."""
    with strategy.scope():
        if teacher is not None and config.student_layers:
            loaded = dataclasses.replace(teacher.loaded)
        else:
            loaded = (task.load_backbone(config) if hasattr(task, "load_backbone")
                      else backbones.load(config.backbone))
        student_info = None
        if config.student_layers:
            depth = loaded.num_layers
            loaded.backbone, chosen = students.shallow_copy(loaded.backbone, config.student_layers)
            student_info = {"layers": config.student_layers, "of": depth, "copied_layers": chosen,
                            "from": "teacher" if teacher is not None else "pretrained backbone"}
            logging.info("student: %d of %d transformer layers (%s), copied from the %s",
                         config.student_layers, depth, chosen, student_info["from"])
    logging.info("backbone: %s (%s), %d transformer layers", loaded.source, loaded.kind,
                 loaded.num_layers)
    return loaded, student_info


def _distill(config: Config, teacher, prep, data, loaded, model_dir: str) -> dict | None:
    """With --teacher: its outputs become the training targets (computed once, cached)."""
    if teacher is None:
        return None
    sources = prep.sources
    info = {"teacher": teacher.path, "teacher_checkpoint": teacher.checkpoint,
            "alpha": config.distill_alpha, "temperature": config.distill_temperature}
    if config.distill_alpha > 0:
        t0 = time.time()
        train_source = distillation.teacher_source(teacher, config, sources["train"], data, loaded)
        sources["train"] = dataclasses.replace(sources["train"], targets=distillation.teacher_outputs(
            teacher, train_source, config, model_dir))
        info["teacher_seconds"] = round(time.time() - t0, 2)
    else:
        logging.info("--distill_alpha=0: the task loss alone (teacher outputs not needed)")
    return info


def _build_loop(config: Config, model_dir: str, strategy, task, prep, model, loaded, start,
                static: bool, jit: bool) -> loop_lib.Loop:
    """The optimizer (L2-SP anchored where asked), the loss (distilled where asked) and the loop."""
    sources = prep.sources
    steps_per_epoch = len(inputs.train_plan(sources["train"].lengths, config.batch_size,
                                            loop_lib.train_buckets(sources["train"], config), config.seed, 0,
                                            static))
    with strategy.scope():
        optimizer = optim.build_optimizer(config, steps_per_epoch * config.epochs)
        if config.regularize_to_pretrained == "l2sp":
            anchored = optimizer.anchor(drift_lib.anchors(start, loaded.backbone), config.l2sp_weight)
            logging.info("L2-SP: %d backbone tensors decay toward their starting values (weight %g); the "
                         "head and the method's own weights decay toward 0", anchored, config.l2sp_weight)
        loss_fn = task.loss_function(model, prep.class_weight)
        if sources["train"].targets is not None:
            loss_fn = distillation.loss_function(loss_fn, config.distill_alpha, config.distill_temperature,
                                                 per_position=sources["train"].targets.ndim == 3)
        return loop_lib.Loop(model, optimizer, loss_fn, strategy, config, model_dir,
                             sources["train"], sources["eval"], prep.epoch_eval, static, jit,
                             prep.predict_function(model) if prep.predict_function else None)


def parameter_counts(model: keras.Model) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the built model."""
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    return int(model.count_params()), trainable
