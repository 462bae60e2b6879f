"""--base_quantization=int8|int4: a frozen base held and multiplied in 8 or 4 bits (QLoRA-style).

Every projection kernel of every transformer block (attention query/key/value/output, the MLP's
gate/up/down or in/out) is quantized in place with Keras' weight-only quantization: int8 with one
scale per output channel, int4 with one scale per 128 inputs of each output channel. Activations
stay float (Keras' `quantize("int8")` would quantize them too unless told not to), and so do the
adapters, norms, embeddings and biases. The quantized kernels are frozen: only LoRA factors or
prompt vectors train, through Keras' custom gradient that uses the dequantized kernel for the
input gradient.

The export folds everything back into float kernels (`dequantized`): the served SavedModel is the
float function that the quantized base plus adapter computes.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from kft.config import FlagError
from kft.models import backbones

MODES = ("int8", "int4")
# Methods whose trained weights are not the projections themselves.
METHODS = ("lora", "prompt")
INT4_BLOCK = 128  # inputs per int4 scale (Keras' default group size)
# The projection attributes of keras-hub's encoder and decoder blocks.
PROJECTIONS = (("_self_attention_layer", "_query_dense"), ("_self_attention_layer", "_key_dense"),
               ("_self_attention_layer", "_value_dense"), ("_self_attention_layer", "_output_dense"),
               ("_cross_attention_layer", "_query_dense"), ("_cross_attention_layer", "_key_dense"),
               ("_cross_attention_layer", "_value_dense"), ("_cross_attention_layer", "_output_dense"),
               (None, "_feedforward_gate_dense"), (None, "_feedforward_intermediate_dense"),
               (None, "_feedforward_output_dense"))


def weight_only_config(mode: str):
    """The Keras quantization config of `mode` for weights only (activations stay float)."""
    if mode == "int8":  # weight-only: no activation quantizer
        return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    return keras.quantizers.Int4QuantizationConfig(activation_quantizer=None, block_size=INT4_BLOCK)


def float_policy(layer):
    """The float dtype policy a (possibly quantized) projection computes in: what a wrapper around
    it (LoRA) takes, whether the base was quantized before or after wrapping."""
    policy = layer.dtype_policy
    if policy.quantization_mode is None:
        return policy
    compute, variable = policy.compute_dtype, policy.variable_dtype
    return keras.dtype_policies.get(compute if compute == variable else f"mixed_{compute}")


def _base(layer):
    """The projection itself (a LoRA wrapper holds it as `.base`)."""
    return getattr(layer, "base", layer)


def projections(backbone) -> list[keras.layers.Layer]:
    """Every Dense / EinsumDense projection of the backbone's transformer blocks, lowest first."""
    found = []
    for block in backbones.transformer_layers(backbone):
        for owner_name, attribute in PROJECTIONS:
            owner = getattr(block, owner_name, None) if owner_name else block
            layer = getattr(owner, attribute, None) if owner is not None else None
            if layer is not None and isinstance(_base(layer), (keras.layers.Dense, keras.layers.EinsumDense)):
                found.append(_base(layer))
    return found


def check(config) -> None:
    """Refuses --base_quantization where it cannot apply, before anything is loaded."""
    mode = getattr(config, "base_quantization", "none")
    if mode == "none":
        return
    if mode not in MODES:
        raise FlagError(f"--base_quantization={mode}: choose none, {', '.join(MODES)}")
    if config.method not in METHODS:
        raise FlagError(f"--base_quantization={mode} keeps the projections frozen in {mode}: it applies to "
                        f"--method={' or --method='.join(METHODS)}, not --method={config.method}")


def apply(backbone, mode: str) -> dict:
    """Quantizes every block projection of `backbone` in place (weight-only); returns a description
    with the kernels' bytes before and after."""
    layers = projections(backbone)
    if not layers:
        raise FlagError(f"--base_quantization={mode}: {type(backbone).__name__} has no block projections "
                        "to quantize")
    before = sum(int(np.prod(layer.kernel.shape)) * 4 for layer in layers)
    for layer in layers:
        if layer.quantization_mode is None:
            layer.quantize(mode, config=weight_only_config(mode))
        layer.trainable = False
    after = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                for layer in layers for v in layer.weights if "bias" not in v.path)
    return {"mode": mode, "layers": len(layers), "kernel_bytes_float32": before, "kernel_bytes": after}


def float_kernel(layer, in_shape: tuple, out_shape: tuple) -> np.ndarray:
    """The float kernel a (possibly quantized) projection computes with, in [*in_shape, *out_shape].

    Read by calling the layer on the identity (minus its bias): what it multiplies by, whatever its
    storage (int8 with per-channel scales, packed int4 with per-group scales).
    """
    if layer.quantization_mode is None:
        return np.asarray(layer.kernel)
    n = math.prod(in_shape)
    equation = getattr(layer, "equation", None)
    rank = len(equation.split(",")[0]) if equation else 2
    lead = (1,) * (rank - len(in_shape) - 1)
    eye = np.eye(n, dtype=np.float32).reshape(lead + (n,) + tuple(in_shape))
    bias = np.asarray(layer(np.zeros_like(eye[:1])), np.float64)  # what the layer adds to any input
    out = np.asarray(layer(eye), np.float64) - bias
    return out.reshape(tuple(in_shape) + tuple(out_shape)).astype(np.float32)


def dequantized(layer, kernel: np.ndarray) -> keras.layers.Layer:
    """A float projection like `layer` (same equation, bias, name) computing with `kernel`."""
    config = layer.get_config()
    config.pop("quantization_config", None)
    config["dtype"] = getattr(layer.dtype_policy, "source_name", None) or "float32"
    config["lora_rank"] = None
    fresh = type(layer).from_config(config)
    if isinstance(layer, keras.layers.EinsumDense):
        fresh.build(_einsum_input_shape(layer, kernel.shape))
    else:
        fresh.build((None, kernel.shape[0]))
    fresh.kernel.assign(kernel)
    if layer.bias is not None:
        fresh.bias.assign(np.asarray(layer.bias))
    return fresh


def _einsum_input_shape(layer, kernel_shape: tuple) -> tuple:
    """An input shape that builds `layer`'s equation with this kernel (leading axes of size 1)."""
    inputs, rest = layer.equation.split(",")
    kernel_axes = rest.split("->")[0]
    sizes = dict(zip(kernel_axes, kernel_shape))
    return tuple(sizes.get(axis, 1) for axis in inputs)
