"""SavedModel export in the TF Serving layout: <export_dir>/<run_name>/<version>/.

Two signatures:
  serving_default: text (tf.string [batch]) -> the task's outputs; tokenization runs in the graph.
  serve_token_ids: token_ids, padding_mask (int32 [batch, length]) -> the same outputs.
`assets.extra/` holds labels.txt and metadata.json. Loading needs `import tensorflow_text` first
(it registers the word-piece tokenizer ops used by serving_default).
"""

from __future__ import annotations

import json
import os
import re

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kft.data import inputs


def next_version(run_dir: str) -> int:
    """1 + the highest integer version folder under run_dir (TF Serving serves the highest)."""
    if not tf.io.gfile.isdir(run_dir):
        return 1
    versions = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(run_dir) if re.fullmatch(r"\d+/?", n)]
    return max(versions, default=0) + 1


def export(model: keras.Model, tokenizer, packing: inputs.Packing, sequence_length: int, task,
           label_names: list[str], export_dir: str, run_name: str, metadata: dict,
           serving_length: int | None = None) -> str:
    """Writes a new version of a classification run's SavedModel and returns its path.

    Served texts are read up to `serving_length` tokens (default: the training cap), not the
    training cap: a text longer than anything seen in training keeps its end. What still does not
    fit is cut and counted per text in the `truncated` output (word pieces dropped).
    """
    serving_length = serving_length or sequence_length
    room = serving_length - len(packing.start) - len(packing.end)

    def outputs(token_ids, padding_mask):
        # An empty request arrives as [0, 0]; the backbone needs one position to index into.
        short = tf.maximum(0, 1 - tf.shape(token_ids)[1])
        token_ids = tf.pad(token_ids, [[0, 0], [0, short]], constant_values=packing.pad)
        padding_mask = tf.pad(padding_mask, [[0, 0], [0, short]])
        probabilities = model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
        return task.serving_outputs(probabilities, label_names)

    def serve_text(text):
        pieces = tokenizer(text)
        ids = inputs.pack(pieces, packing, serving_length)
        token_ids = ids.to_tensor(default_value=packing.pad)
        padding_mask = tf.ones_like(ids).to_tensor(default_value=0)
        cut = tf.maximum(tf.cast(pieces.row_lengths(), tf.int32) - room, 0)
        return {**outputs(token_ids, padding_mask), "truncated": cut}

    endpoints = {
        "serving_default": (serve_text, [tf.TensorSpec([None], tf.string, name="text")]),
        "serve_token_ids": (outputs, [tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                                      tf.TensorSpec([None, None], tf.int32, name="padding_mask")]),
    }
    return write(model, tokenizer, endpoints, label_names, export_dir, run_name,
                 {**metadata, "sequence_length": sequence_length, "serving_sequence_length": serving_length})


def write(model: keras.Model, tokenizer, endpoints: dict, label_names: list[str], export_dir: str,
          run_name: str, metadata: dict) -> str:
    """Writes `endpoints` ({name: (function, input signature)}) as a new SavedModel version.

    `tokenizer`: the tokenizer layer, or a list of the resources (layers, tf.Modules with lookup
    tables) the endpoints read besides the model's weights.

    The version is written under a temporary name and renamed when complete, so a server watching
    the folder never sees a half-written version; what an interrupted export left is removed here.
    """
    run_dir = os.path.join(export_dir, run_name)
    if tf.io.gfile.isdir(run_dir):
        for name in tf.io.gfile.listdir(run_dir):
            if re.fullmatch(r"\.tmp-\d+/?", name):
                tf.io.gfile.rmtree(os.path.join(run_dir, name.rstrip("/")))
                logging.warning("removed %s: an export an interrupted run left incomplete",
                                os.path.join(run_dir, name.rstrip("/")))
    version = next_version(run_dir)
    final = os.path.join(run_dir, str(version))
    tmp = os.path.join(run_dir, f".tmp-{version}")
    tf.io.gfile.makedirs(run_dir)
    resources = tokenizer if isinstance(tokenizer, list) else [tokenizer]
    for resource in resources:
        if isinstance(resource, keras.layers.Layer) and not resource.built:
            resource.build(None)  # ExportArchive tracks built layers only; a tokenizer has no weights
    archive = keras.export.ExportArchive()
    # The model is not `track`ed: ExportArchive.track() lists the Keras variables, and write_out()
    # adds the tf.Variables the endpoints capture (`_all_variables`), so every weight was written
    # twice (keras-team/keras #23553). The endpoints' own captures are all serving needs.
    for i, resource in enumerate(resources):
        if isinstance(resource, keras.layers.Layer):
            archive.track(resource)
        else:  # a tf.Module (lookup tables): ExportArchive.track takes Keras layers only, and a
            # SavedModel must reach every resource its functions capture from its root object.
            setattr(archive._tf_trackable, f"kft_resource_{i}", resource)
    for name, (fn, signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    # TensorFlow logs its SavedModel internals at INFO ("Function `serve_text` contains input
    # name(s) ... unsupported characters", sharding durations, fingerprints): kft says what matters.
    # Some of it goes through absl's logger, some through TensorFlow's.
    # The loggers' own levels are put back as they were (NOTSET included: absl's set_verbosity
    # would pin an explicit level and silence INFO records that the root level lets through).
    quieted = [tf.get_logger(), logging.get_absl_logger()]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel("WARNING")
    try:
        archive.write_out(tmp, verbose=False)
    finally:
        for logger, level in zip(quieted, levels):
            logger.setLevel(level)

    stored, weights = variables_bytes(tmp), weight_bytes(model)
    if stored > 1.5 * weights + 1_000_000:  # the checkpoint's index and object graph add a little
        logging.warning("the export's variables take %.1f MB for %.1f MB of weights: some are stored "
                        "more than once", stored / 1e6, weights / 1e6)
    metadata = {**metadata, "variables_bytes": stored, "weight_bytes": weights}

    extra = os.path.join(tmp, "assets.extra")
    tf.io.gfile.makedirs(extra)
    if label_names:
        with tf.io.gfile.GFile(os.path.join(extra, "labels.txt"), "w") as f:
            f.write("".join(name + "\n" for name in label_names))
    with tf.io.gfile.GFile(os.path.join(extra, "metadata.json"), "w") as f:
        json.dump({**metadata, "labels": label_names, "signatures": list(endpoints),
                   "serving_imports": ["tensorflow", "tensorflow_text"]}, f, indent=2, default=str)
    tf.io.gfile.rename(tmp, final)
    logging.info("exported SavedModel version %d to %s", version, final)
    return final


def variables_bytes(path: str) -> int:
    """Bytes under a SavedModel's variables/ folder (what a server reads into memory)."""
    folder = os.path.join(path, "variables")
    return sum(tf.io.gfile.stat(os.path.join(folder, name)).length for name in tf.io.gfile.listdir(folder))


def weight_bytes(model: keras.Model) -> int:
    """Bytes of the model's weights as stored (parameters x bytes per parameter, per dtype)."""
    unique = {id(w): w for w in model.weights}.values()
    return int(sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in unique))


def load(path: str):
    """Loads an exported model for serving (registers the tensorflow_text ops first)."""
    import tensorflow_text  # noqa: F401  (registers FastWordpieceTokenize* ops)

    if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"{path}: no saved_model.pb; pass a version folder such as "
                                "saved_models/<run>/<version>")
    return tf.saved_model.load(path)


def read_labels(path: str) -> list[str]:
    with tf.io.gfile.GFile(os.path.join(path, "assets.extra", "labels.txt")) as f:
        return [line.rstrip("\n") for line in f if line.strip()]
