"""Students that keep K of a backbone's transformer layers (structured pruning by depth).

As DistilBERT initialised its student: the same architecture with fewer blocks, each block a copy
of one of the source's, chosen evenly spaced from the lowest to the highest so the student keeps
the first block (next to the embeddings) and the last (next to the head). The embeddings and
everything around the blocks are copied too.
"""

from __future__ import annotations

import keras
import numpy as np

from kft.models import backbones
from kft.config import FlagError


def chosen_layers(depth: int, keep: int) -> list[int]:
    """Indices of the `keep` blocks a student takes from a `depth`-block source, evenly spaced."""
    if not 1 <= keep <= depth:
        raise FlagError(f"--student_layers={keep}: the source backbone has {depth} transformer layers; "
                        f"choose 1..{depth}")
    if keep == 1:
        return [depth - 1]
    return [int(i) for i in np.floor(np.linspace(0, depth - 1, keep) + 0.5)]


def shallow_copy(source: keras.Model, keep: int) -> tuple[keras.Model, list[int]]:
    """A new backbone of the source's class with `keep` blocks, weights copied from the source."""
    blocks = backbones.transformer_layers(source)
    chosen = chosen_layers(len(blocks), keep)
    config = source.get_config()
    if "num_layers" not in config:
        raise FlagError(f"--student_layers: {type(source).__name__} has no num_layers setting to shrink")
    student = type(source).from_config({**config, "num_layers": keep})
    student_blocks = backbones.transformer_layers(student)
    block_ids = {id(layer) for layer in student_blocks}
    by_name = {layer.name: layer for layer in source.layers}
    for layer in student.layers:  # embeddings, their norm, a pooler: the same names in both
        if id(layer) not in block_ids and layer.weights:
            layer.set_weights(by_name[layer.name].get_weights())
    for target, index in zip(student_blocks, chosen):
        target.set_weights(blocks[index].get_weights())
    return student, chosen


def copy_head(teacher: keras.Model, student: keras.Model) -> list[str]:
    """Copies the teacher's head (every weighted layer outside the backbone, matched by name and
    shapes) into a student built on a shallow copy of the teacher's backbone."""
    by_name = {layer.name: layer for layer in teacher.layers}
    copied = []
    for layer in student.layers:
        source = by_name.get(layer.name)
        if isinstance(layer, keras.Model) or source is None or not layer.weights:
            continue
        if [w.shape for w in layer.weights] == [w.shape for w in source.weights]:
            layer.set_weights(source.get_weights())
            copied.append(layer.name)
    return copied
