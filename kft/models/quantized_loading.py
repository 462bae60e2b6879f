"""Loading a Hugging Face decoder with its block projections already in int8 / int4.

`--base_quantization` used to load the whole backbone in float32 and quantize afterwards, so a
1.7B-parameter model held 6.8 GB of float32 kernels at once. Here the backbone is built with a
`DTypePolicyMap` that gives every block projection a quantized policy (its variables are created
as int8 / packed int4 plus scales, never as float kernels), and keras-hub's own converter then
ports the checkpoint: while it runs, a projection's `kernel` is a stand-in whose `assign` quantizes
the one float tensor it is given, with the same Keras quantizer calls `layer.quantize()` makes.
The safetensors files are read tensor by tensor with plain file reads (not a memory map, whose
touched pages would count as the process's memory until the file is closed).

The result equals loading in float and then `quantized_base.apply`: the same int values, scales,
zero points and dtype policies, hence the same function.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct

import keras
import numpy as np
from absl import logging

from kft.methods import quantized_base

# Layer names keras-hub gives the block projections that quantized_base.PROJECTIONS names
# (llama-family attention and MLP; keras' MultiHeadAttention uses the same attention names).
PROJECTION_NAMES = ("query", "key", "value", "attention_output", "feedforward_gate_dense",
                    "feedforward_intermediate_dense", "feedforward_output_dense")
_PATH = r"(.*/)?transformer_layer_\d+/(.*/)?(" + "|".join(PROJECTION_NAMES) + ")"
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}


def policy_map(mode: str) -> keras.dtype_policies.DTypePolicyMap:
    """The backbone's dtype: block projections `mode` (int4 with kft's block size), the rest as the
    global policy (float32 unless set otherwise)."""
    source = keras.config.dtype_policy().name
    name = f"int4/{quantized_base.INT4_BLOCK}" if mode == "int4" else mode
    policies = keras.dtype_policies.DTypePolicyMap(default_policy=source)
    policies[_PATH] = keras.dtype_policies.get(f"{name}_from_{source}")
    return policies


def kernel_shape(layer) -> tuple:
    """The [*in, *out] shape of the float kernel a projection stands for (packed int4 included),
    read from what the layer recorded at build time rather than by unpacking the kernel."""
    if layer.quantization_mode == "int4":
        shape = getattr(layer, "original_kernel_shape", None)  # EinsumDense
        if shape is None and hasattr(layer, "_orig_input_dim"):  # Dense
            shape = (layer._orig_input_dim, layer._orig_output_dim)
        if shape is not None:
            return tuple(int(d) for d in shape)
    return tuple(int(d) for d in layer.kernel.shape)


def quantized_values(layer, kernel: np.ndarray, mode: str) -> dict:
    """What `layer.quantize(mode, config=quantized_base.weight_only_config(mode))` stores for this
    float kernel, by the same Keras quantizer calls, keyed by the quantized variables' names.

    `layer` is the projection already built quantized (its einsum axes are analysed at build time).
    """
    config = quantized_base.weight_only_config(mode)
    einsum = isinstance(layer, keras.layers.EinsumDense)
    if mode == "int8":
        axis = layer._kernel_reduced_axes if einsum else 0
        quantizer = keras.quantizers.QuantizationConfig.weight_quantizer_or_default(
            config, keras.quantizers.AbsMaxQuantizer(axis=axis))
        values, scale = quantizer(kernel, to_numpy=True)
        scale = layer._adjust_scale_for_quant(scale, "kernel") if einsum else keras.ops.squeeze(scale, axis=0)
        return {"kernel": values, "kernel_scale": scale}
    if not config.block_size or config.block_size < 1:
        raise ValueError(f"int4 block size {config.block_size}: only grouped int4 is loaded quantized")
    if einsum:  # Keras flattens to [reduced axes, the others] before grouping
        reduced = set(layer._kernel_reduced_axes)
        rows = math.prod(d for i, d in enumerate(kernel.shape) if i in reduced)
        kernel = kernel.reshape(rows, -1)
    values, scale, zero = keras.quantizers.abs_max_quantize_grouped_with_zero_point(
        kernel, block_size=config.block_size, to_numpy=True)
    packed, _, _ = keras.quantizers.pack_int4(values, axis=-1)
    return {"kernel": packed, "kernel_scale": scale, "kernel_zero": zero}


class PendingKernel:
    """Stands in for a quantized projection's float kernel while a converter ports weights: it has
    the float kernel's shape, and assigning a float tensor quantizes it into the layer."""

    def __init__(self, layer, mode: str):
        self.layer, self.mode = layer, mode
        self.shape = tuple(kernel_shape(layer))
        self.dtype = keras.config.dtype_policy().variable_dtype
        self.assigned = 0

    def assign(self, value) -> None:
        kernel = np.asarray(keras.ops.convert_to_numpy(value)).astype(self.dtype)
        if kernel.shape != self.shape:
            raise ValueError(f"{self.layer.path}: the checkpoint's kernel has shape {kernel.shape}, the "
                             f"layer expects {self.shape}")
        if not np.isfinite(kernel).all():
            raise ValueError(f"{self.layer.path}: the checkpoint's kernel holds NaN or Inf")
        variables = {v.name: v for v in self.layer.weights}
        for name, values in quantized_values(self.layer, kernel, self.mode).items():
            variables[name].assign(values)
        self.assigned += 1


@contextlib.contextmanager
def quantize_on_assign(layers: list, mode: str):
    """Within the block, `layer.kernel` of each of these quantized projections is a PendingKernel
    (every other Dense / EinsumDense is untouched); yields {id(layer): PendingKernel}."""
    pending = {id(layer): PendingKernel(layer, mode) for layer in layers}
    originals = {cls: cls.__dict__["kernel"] for cls in (keras.layers.Dense, keras.layers.EinsumDense)}

    def stand_in(original):
        return property(lambda self: pending[id(self)] if id(self) in pending else original.fget(self))

    try:
        for cls, original in originals.items():
            setattr(cls, "kernel", stand_in(original))
        yield pending
    finally:
        for cls, original in originals.items():
            setattr(cls, "kernel", original)


def _file_reader(preset: str):
    """keras-hub's SafetensorLoader (same key and shard lookup), reading each tensor with a plain
    file read instead of a memory map."""
    from keras_hub.src.utils.preset_utils import SAFETENSOR_FILE, get_file
    from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader

    class FileReader(SafetensorLoader):
        def __init__(self):
            super().__init__(preset)
            self.headers = {}

        def header(self, fname: str) -> tuple:
            if fname not in self.headers:
                path = get_file(self.preset, fname)
                with open(path, "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(size))
                header.pop("__metadata__", None)
                self.headers[fname] = (path, 8 + size, header)
            return self.headers[fname]

        def get_tensor(self, hf_weight_key):
            if self.safetensor_config is None:
                fname = self.fname or SAFETENSOR_FILE
            else:
                weight_map = self.safetensor_config["weight_map"]
                fname = weight_map[self.get_prefixed_key(hf_weight_key, weight_map)]
            path, start, header = self.header(fname)
            info = header[self.get_prefixed_key(hf_weight_key, header)]
            begin, end = info["data_offsets"]
            data = bytearray(end - begin)
            with open(path, "rb") as f:
                f.seek(start + begin)
                f.readinto(data)
            return np.frombuffer(data, _dtype(info["dtype"])).reshape(info["shape"])

    return FileReader()


def _dtype(name: str):
    if name == "BF16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"safetensors dtype {name} is not supported")
    return np.dtype(_DTYPES[name])


def _prepare(backbone, mode: str) -> tuple[list, list, list]:
    """(projections built quantized, projections left float, paths of other layers the map
    quantized). Built from a policy alone, an int8 layer would quantize its inputs too: each
    projection is made weight-only as `layer.quantize(mode, config)` makes it."""
    projections = quantized_base.projections(backbone)
    ids = {id(layer) for layer in projections}
    stray = [layer.path for layer in backbone._flatten_layers(include_self=False)
             if layer.quantization_mode is not None and id(layer) not in ids]
    built = [layer for layer in projections if layer.quantization_mode == mode]
    for layer in built:
        layer.quantization_config = quantized_base.weight_only_config(mode)
        layer.inputs_quantizer = None
    return built, [layer for layer in projections if layer.quantization_mode is None], stray


def _own_policies(backbone) -> None:
    """Gives every layer the policy the map resolved for it, and the backbone the plain default:
    as after `layer.quantize`, so get_config (a saved preset, a student copy) and layers built
    later from a block's policy see the current quantization, not the loading map."""
    for layer in backbone._flatten_layers(include_self=True):
        policy = layer._dtype_policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            layer._dtype_policy = policy[layer.path] if layer.path and layer is not backbone \
                else policy.default_policy


def load_backbone(location: str, mode: str, load_weights: bool = True, **kwargs):
    """The backbone of a Hugging Face folder with its block projections created in `mode` and
    filled while loading, and a note for the log; None where the checkpoint is not a Hugging Face
    folder keras-hub converts (the caller loads in float and quantizes afterwards)."""
    import keras_hub
    from keras_hub.src.utils.preset_utils import get_preset_loader
    from keras_hub.src.utils.transformers.preset_loader import TransformersPresetLoader

    loader = get_preset_loader(location)
    if not isinstance(loader, TransformersPresetLoader):
        return None
    backbone = keras_hub.models.Backbone.from_preset(location, load_weights=False, dtype=policy_map(mode),
                                                     **kwargs)
    built, left, stray = _prepare(backbone, mode)
    if stray:  # an architecture whose other layers share the projections' names
        logging.warning("--base_quantization=%s: loading in float32 and quantizing afterwards (the "
                        "names of %s match block projections)", mode, stray[:3])
        return None
    if load_weights:
        with _file_reader(location) as reader, quantize_on_assign(built, mode) as pending:
            loader.converter.convert_weights(backbone, reader, loader.config)
        unfilled = [p.layer.path for p in pending.values() if not p.assigned]
        if unfilled:
            raise ValueError(f"the checkpoint converter never assigned {len(unfilled)} projection "
                             f"kernel(s): {unfilled[:5]}")
    _own_policies(backbone)
    note = (f"base_quantization: {len(built)} block projections created {mode} and quantized while "
            "loading (no float32 copy of them was held)")
    if left:
        note += f"; {len(left)} loaded in float32, quantized afterwards: {[x.path for x in left][:3]}"
    return backbone, note


def logical_weight_sizes(backbone) -> list[tuple[str, int]]:
    """(path, element count) of every backbone weight in order, a quantized projection's kernel
    counted as the float kernel it stands for and its scales, zero points and group indices left
    out: what a checkpoint's tensors are matched against."""
    logical, extra = {}, set()
    for layer in quantized_base.projections(backbone):
        if layer.quantization_mode is not None:
            for v in layer.weights:
                if v.name == "kernel":
                    logical[id(v)] = math.prod(kernel_shape(layer))
                elif v.name != "bias":
                    extra.add(id(v))
    return [(w.path, logical.get(id(w), int(np.prod(w.shape)))) for w in backbone.weights if id(w) not in extra]
