"""Adapters: a run's trainable part alone, saved after training and loaded back with --adapter.

One backbone serves many tasks when each task keeps only what it trained: LoRA factors, prompt or
prefix vectors, BitFit biases, unfrozen layers, and the head. The file is safetensors (no pickle);
its metadata records the method flags and labels, and loading refuses an adapter whose flags,
labels or tensor shapes differ from the run's, naming the file and the field.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import tensorflow as tf
from safetensors.numpy import load as load_bytes, save as save_bytes

from kft.config import FlagError

FILENAME = "adapter.safetensors"
# Flags that decide which weights exist and what they mean; an adapter needs the same values.
STRUCTURE_FLAGS = ("task", "method", "freeze_layers", "lora_rank", "lora_alpha", "lora_targets",
                   "num_prompt_tokens", "prefix_length", "prefix_projection", "pooling", "crf")


def _key(index: int, variable) -> str:
    # Paths can repeat across blocks (a wrapper's weights are named after the wrapped layer), so the
    # position in model.trainable_variables, which a given structure fixes, makes the key unique.
    return f"{index:04d}:{variable.path}"


def save(model, config, path: str, labels: list[str], backbone: str) -> dict:
    """Writes the model's trainable variables and the flags needed to rebuild them."""
    tensors = {_key(i, v): np.ascontiguousarray(v.numpy()) for i, v in enumerate(model.trainable_variables)}
    meta = {"flags": {f: getattr(config, f) for f in STRUCTURE_FLAGS}, "labels": labels,
            "backbone": backbone}
    blob = save_bytes(tensors, metadata={"kft_adapter": json.dumps(meta)})
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(blob)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return {"path": path, "tensors": len(tensors), "parameters": int(sum(t.size for t in tensors.values())),
            "bytes": len(blob)}


def load(model, config, path: str, labels: list[str]) -> dict:
    """Assigns a saved adapter to the model's trainable variables; returns a summary for metrics."""
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, FILENAME)
    if not tf.io.gfile.exists(path):
        raise FlagError(f"--adapter={path}: no such file (an earlier run writes <model_dir>/{FILENAME})")
    with tf.io.gfile.GFile(path, "rb") as f:  # any filesystem TF reads (gs:// too)
        blob = f.read()
    try:
        (size,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(json.loads(blob[8:8 + size]).get("__metadata__", {}).get("kft_adapter", "null"))
        tensors = load_bytes(blob)
    except Exception as e:  # struct, json and safetensors each raise their own errors for damaged files
        raise FlagError(f"--adapter={path}: not a readable safetensors file: {type(e).__name__}: {e}") from e
    if not meta:
        raise FlagError(f"--adapter={path}: no kft adapter metadata; it was not written by kft")
    for name, saved in meta["flags"].items():
        current = json.loads(json.dumps(getattr(config, name)))  # tuples -> lists, as saved
        if saved != current:
            raise FlagError(f"--adapter={path}: it was trained with --{name}={_show(saved)}, this run has "
                            f"--{name}={_show(current)}")
    if meta["labels"] != list(labels):
        raise FlagError(f"--adapter={path}: its labels are {meta['labels']}, this run's data has {labels}")
    variables = model.trainable_variables
    keys = sorted(tensors)
    if len(keys) != len(variables):
        raise FlagError(f"--adapter={path}: {len(keys)} tensors, but this model trains {len(variables)} "
                        "variables (a different backbone?)")
    for key, variable in zip(keys, variables):
        if tuple(tensors[key].shape) != tuple(variable.shape):
            raise FlagError(f"--adapter={path}: tensor {key} has shape {tuple(tensors[key].shape)}, the "
                            f"model's {variable.path} has {tuple(variable.shape)} (a different backbone?)")
    for key, variable in zip(keys, variables):
        variable.assign(tensors[key])
    return {"path": path, "tensors": len(keys), "backbone": meta["backbone"],
            "parameters": int(sum(t.size for t in tensors.values()))}


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
