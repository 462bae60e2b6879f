"""Training checkpoints that are complete or absent, verified on load, and found after a crash.

A checkpoint is one safetensors file `ckpt-<step>.safetensors` holding every model variable
(weights and dropout seed states) and every optimizer variable (step counter, moments), plus the
loop's state (epoch, position in the epoch, early-stopping record) as JSON metadata and a SHA-256
of the tensors. It is written under a temporary name and renamed when complete: on a local disk the
rename is atomic, and on GCS an object only appears once its upload has finished, so a kill at any
moment leaves either the whole file or none. All I/O goes through tf.io.gfile (local or gs://).
Nothing here unpickles: safetensors holds raw arrays only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct

import numpy as np
import tensorflow as tf
from absl import logging
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

_NAME = re.compile(r"ckpt-(\d+)\.safetensors$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not belong to this model; names the file or folder."""


@dataclasses.dataclass
class Checkpoint:
    step: int
    path: str
    state: dict
    tensors: dict  # "model/00012" / "optimizer/00003" -> np.ndarray


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(memoryview(np.ascontiguousarray(tensors[key])).cast("B"))
    return h.hexdigest()


def _describe(v) -> str:
    return f"{getattr(v, 'path', None) or v.name}:{list(v.shape)}"


def _generic(description: str) -> str:
    """The path without the numeric suffixes Keras adds to auto-generated names (dense_3 -> dense),
    which depend on how many objects the process created before, not on the model."""
    return re.sub(r"_\d+(?=[/:])", "", description)


def _collect(variables, prefix: str) -> tuple[dict, list]:
    tensors, paths = {}, []
    for i, v in enumerate(variables):
        tensors[f"{prefix}/{i:05d}"] = np.asarray(v.numpy())
        paths.append(_describe(v))
    return tensors, paths


def path_for(folder: str, step: int) -> str:
    return os.path.join(folder, f"ckpt-{step:08d}.safetensors")


def save(folder: str, step: int, model_variables, optimizer_variables, state: dict,
         keep: int = 3) -> str:
    """Writes checkpoint `step` atomically, then deletes all but the newest `keep`.

    Refuses to save non-finite weights: a checkpoint must always be a state worth resuming from.
    """
    tensors, model_paths = _collect(model_variables, "model")
    opt_tensors, opt_paths = _collect(optimizer_variables, "optimizer")
    for key, value in tensors.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise CheckpointError(f"not saving step {step}: model variable {model_paths[int(key[6:])]} "
                                  "holds NaN/Inf")
    tensors.update(opt_tensors)
    metadata = {"state": json.dumps(state), "model_variables": json.dumps(model_paths),
                "optimizer_variables": json.dumps(opt_paths), "sha256": _digest(tensors)}
    blob = st_save(tensors, metadata=metadata)
    tf.io.gfile.makedirs(folder)
    final = path_for(folder, step)
    tmp = f"{final}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(blob)
    tf.io.gfile.rename(tmp, final, overwrite=True)
    for old in list_steps(folder)[:-keep] if keep > 0 else []:
        tf.io.gfile.remove(path_for(folder, old))
    return final


def list_steps(folder: str) -> list[int]:
    """Steps of the complete-looking checkpoints in `folder`, oldest first."""
    if not tf.io.gfile.isdir(folder):
        return []
    return sorted(int(m.group(1)) for n in tf.io.gfile.listdir(folder) if (m := _NAME.match(n)))


def remove_partial(folder: str) -> int:
    """Deletes temporary files left by a writer that was killed; returns how many."""
    if not tf.io.gfile.isdir(folder):
        return 0
    stale = [n for n in tf.io.gfile.listdir(folder) if ".safetensors.tmp-" in n]
    for n in stale:
        tf.io.gfile.remove(os.path.join(folder, n))
    if stale:
        logging.warning("%s: removed %d partial checkpoint file(s) from an interrupted write: %s",
                        folder, len(stale), stale)
    return len(stale)


def read(path: str) -> Checkpoint:
    """Loads and verifies one checkpoint file; CheckpointError says what is wrong with it."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            blob = f.read()
        (header_len,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + header_len])
        metadata = header.get("__metadata__", {})
        tensors = st_load(blob)
    except Exception as e:  # truncated, garbage, unreadable: all mean "not usable"
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    if "sha256" not in metadata or "state" not in metadata:
        raise CheckpointError(f"{path}: not a kft checkpoint (no state / checksum metadata)")
    if _digest(tensors) != metadata["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch; the file was modified or corrupted")
    step = int(_NAME.search(path).group(1))
    state = json.loads(metadata["state"])
    state["model_variables"] = json.loads(metadata["model_variables"])
    state["optimizer_variables"] = json.loads(metadata["optimizer_variables"])
    return Checkpoint(step, path, state, tensors)


def latest(folder: str) -> Checkpoint | None:
    """The newest checkpoint that verifies, skipping (and logging) bad ones.

    Returns None when the folder holds no checkpoint at all; raises CheckpointError naming the
    folder when checkpoints exist but none is usable, rather than silently starting over.
    """
    steps = list_steps(folder)
    bad = []
    for step in reversed(steps):
        try:
            ckpt = read(path_for(folder, step))
        except CheckpointError as e:
            logging.warning("skipping bad checkpoint: %s", e)
            bad.append(str(e))
            continue
        if bad:
            logging.warning("falling back to %s after %d bad newer checkpoint(s)", ckpt.path, len(bad))
        return ckpt
    if bad:
        raise CheckpointError(f"{folder}: none of the {len(bad)} checkpoint(s) is usable: "
                              + "; ".join(bad) + ". Move them away to start over.")
    return None


def restore(ckpt: Checkpoint, model_variables, optimizer_variables) -> None:
    """Assigns a checkpoint's values; refuses one written by a different model or optimizer.
    `optimizer_variables=None` restores the model alone (a teacher, a served model)."""
    for prefix, variables, key in (("model", model_variables, "model_variables"),
                                   ("optimizer", optimizer_variables, "optimizer_variables")):
        if variables is None:
            continue
        variables = list(variables)
        expected = [_describe(v) for v in variables]
        saved = ckpt.state[key]
        if [_generic(p) for p in saved] != [_generic(p) for p in expected]:
            diff = next((f"#{i}: saved {a}, model {b}" for i, (a, b) in enumerate(zip(saved, expected))
                         if a != b), f"saved {len(saved)} variables, model has {len(expected)}")
            raise CheckpointError(f"{ckpt.path}: {prefix} variables do not match this run ({diff}); "
                                  "was it written with other flags or another backbone?")
        for i, v in enumerate(variables):
            v.assign(ckpt.tensors[f"{prefix}/{i:05d}"])
