"""Tasks: each module prepares its data, builds its head, and says how to train, score and serve it.

A task module exposes `load_data(config)`, optionally `load_backbone(config)` (default: an encoder
through `backbones.load`) and `check_method(backbone, config)`,, `prepare(config, data, loaded, model_dir, is_chief) ->
Prepared`, `build(backbone, names, config)`, `loss_function(model)` and `export(...)`. The trainer,
loop, tuning methods, strategies and checkpoints are shared by every task.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from kft.tasks import causal_lm, classification, question_answering, seq2seq, token_classification

TASKS = {"classification": classification, "token_classification": token_classification,
         "question_answering": question_answering, "causal_lm": causal_lm, "seq2seq": seq2seq}


def get(name: str):
    return TASKS[name]


@dataclasses.dataclass
class Prepared:
    """A task's data, tokenized once, and how its outputs are scored."""

    names: list[str]  # class or tag names, saved with the model
    sequence_length: int
    sources: dict  # split name -> loop.Split ("train", "eval", optional "test")
    stats: dict  # per-split statistics for metrics.json
    description: str
    seconds: float  # reading + tokenizing
    train_lengths: np.ndarray  # tokens per training example, special tokens included
    evaluate: Callable  # (split name, model outputs, model) -> report dict
    epoch_eval: Callable  # eval outputs -> {"accuracy", "loss"} for the loop's epoch ends
    format: Callable  # report -> text for the log
    write_outputs: Callable  # (reports, model_dir) -> charts and label files (chief only)
    headline: tuple = ("accuracy", "macro_f1")  # report entries copied into export metadata
    class_weight: dict | None = None
    model: object = None  # set by the trainer once built (token tasks decode with its CRF)
    # model -> fn(features, labels) -> what evaluation keeps per example (default: the model's outputs)
    predict_function: Callable | None = None
    data: object = None  # the task's examples as read, where its export needs them
