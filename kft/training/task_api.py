"""What a task is to the training core, and the registry the core finds tasks in.

The core (training, data, models) never imports a task: `kft.tasks` registers the five built-in
tasks here when it is imported (the entry points import it), and the trainer looks a task up by its
--task name. A task module exposes `load_data(config)`, optionally `load_backbone(config)` (default:
an encoder through `backbones.load`) and `check_method(backbone, config)`, `prepare(config, data,
loaded, model_dir, is_chief) -> Prepared`, `build(backbone, names, config)`,
`loss_function(model, class_weight)` and `export(...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

_REGISTRY: dict = {}


def register(name: str, module) -> None:
    """Makes `module` the task that --task=`name` runs."""
    _REGISTRY[name] = module


def get(name: str):
    """The task module registered for --task=`name`."""
    if name not in _REGISTRY:
        raise KeyError(f"no task {name!r} is registered (registered: {sorted(_REGISTRY) or 'none'}); "
                       "`import kft.tasks` registers the built-in ones")
    return _REGISTRY[name]


@dataclasses.dataclass
class Prepared:
    """A task's data, tokenized once, and how its outputs are scored."""

    names: list[str]  # class or tag names, saved with the model
    sequence_length: int
    sources: dict  # split name -> loop.Feed ("train", "eval", optional "test")
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
