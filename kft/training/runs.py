"""A finished kft run rebuilt in memory from its --model_dir: the same backbone, method and head,
with the weights of its last checkpoint (of `best/` when it stopped early on the best epoch).

Used where the trained Keras model is needed rather than its export: a distillation teacher, and
attributions (gradients through the model).
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import tensorflow as tf
from absl import logging

from kft import config as config_lib, methods
from kft.models import backbones
from kft.training import checkpoints
from kft.config import Config, FlagError


@dataclasses.dataclass
class Run:
    path: str
    config: Config
    model: keras.Model
    loaded: object  # backbones.Loaded, with the run's plain backbone (LoRA merged)
    names: list[str]  # labels (classification) or tags (token classification)
    checkpoint: str
    sequence_length: int
    metrics: dict


def read_config(path: str, flag: str = "--model_dir") -> tuple[Config, dict]:
    """The run's Config and metrics.json; a folder that is not a finished run is refused."""
    metrics_path = os.path.join(path, "metrics.json")
    if not tf.io.gfile.exists(metrics_path):
        raise FlagError(f"{flag}={path}: no metrics.json there; pass the --model_dir of a finished kft run")
    with tf.io.gfile.GFile(metrics_path) as f:
        metrics = json.load(f)
    known = {f.name for f in config_lib.fields()}
    return Config(**{k: v for k, v in metrics["config"].items() if k in known}), metrics


def load_run(path: str, flag: str = "--model_dir") -> Run:
    """Rebuilds the run at `path` and restores its final weights (model only, no optimizer)."""
    from kft.training import task_api

    run_config, metrics = read_config(path, flag)
    task = task_api.get(run_config.task)
    names = list(metrics["data"]["labels"])
    loaded = (task.load_backbone(run_config) if hasattr(task, "load_backbone")
              else backbones.load(run_config.backbone))
    if run_config.student_layers:
        # the student's depth; its weights come from the checkpoint below
        from kft.compression import students

        loaded.backbone, _ = students.shallow_copy(loaded.backbone, run_config.student_layers)
    backbone, _ = methods.apply(loaded.backbone, run_config, None)
    model = task.build(backbone, names, run_config)
    folder = os.path.join(path, "best" if run_config.early_stopping_patience else "checkpoints")
    ckpt = checkpoints.latest(folder) or checkpoints.latest(os.path.join(path, "checkpoints"))
    if ckpt is None and run_config.epochs == 0 and run_config.task in ("causal_lm", "seq2seq"):
        # A zero-shot decoder (or encoder–decoder) run trained nothing and saved nothing: its model is the pretrained one.
        source = "the pretrained model (an --epochs=0 run)"
    elif ckpt is None and run_config.epochs == 0:
        raise FlagError(f"{flag}={path}: an --epochs=0 run trained nothing and its new "
                        f"{run_config.task} head is random; run it with --epochs >= 1")
    elif ckpt is None:
        raise FlagError(f"{flag}={path}: no checkpoint under {folder}")
    else:
        checkpoints.restore(ckpt, model.variables, None)
        source = ckpt.path
    methods.prepare_export(loaded.backbone, run_config)  # LoRA merged: the plain function
    logging.info("loaded run %s (%s, --method=%s, %d layers, labels %s) with the weights of %s", path,
                 loaded.source, run_config.method, len(backbones.transformer_layers(loaded.backbone)),
                 names, source)
    return Run(path, run_config, model, loaded, names, source, int(metrics["sequence_length"]), metrics)
