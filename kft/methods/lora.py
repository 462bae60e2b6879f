"""LoRA (Hu et al., 2021) on the backbone's attention and feed-forward projections.

Each targeted projection keeps its pretrained kernel W frozen and learns a low-rank update: the
layer computes W x + (alpha / rank) * B(A x), with A [in, rank] and B [rank, out] over the
projection's flattened input and output axes (for attention, all heads together: the standard
LoRA shape, r * (in + out) parameters). B starts at zero, so training starts from the pretrained
function. Keras' own `enable_lora` is standard for Dense but, for the attention's EinsumDense,
factorises per head (kernel.shape[:-1] + rank); kft wraps every target the same way instead.
Every other backbone weight is frozen; the task head trains.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from kft.methods import quantized_base
from kft.models import backbones
from kft.config import FlagError
from kft.methods.lora_targets import ALL_LINEAR, DECODER_TASKS, ENCODER_DEFAULT

# --lora_targets names -> (sublayer holding the projection, attribute) in a keras-hub TransformerEncoder.
TARGETS = {
    "query": ("_self_attention_layer", "_query_dense"),
    "key": ("_self_attention_layer", "_key_dense"),
    "value": ("_self_attention_layer", "_value_dense"),
    "attention_output": ("_self_attention_layer", "_output_dense"),
    "ffn_in": (None, "_feedforward_intermediate_dense"),
    "ffn_out": (None, "_feedforward_output_dense"),
    # Decoder names (llama-family MLP: down(silu(gate(x)) * up(x))); up and down alias ffn_in/ffn_out.
    "gate": (None, "_feedforward_gate_dense"),
    "up": (None, "_feedforward_intermediate_dense"),
    "down": (None, "_feedforward_output_dense"),
}

# An encoder–decoder's decoder blocks (BART) also attend to the encoder: the attention targets adapt
# that cross-attention's projections too (as PEFT's q_proj/v_proj targets do for BART).
CROSS = {name: ("_cross_attention_layer", attribute) for name, (owner, attribute) in TARGETS.items()
         if owner == "_self_attention_layer"}



def _split(layer) -> int:
    """How many leading kernel axes the projection contracts with its input."""
    equation = getattr(layer, "equation", None)
    if equation is None:  # Dense: kernel [in, out]
        return 1
    inputs, rest = equation.split(",")
    kernel = rest.split("->")[0]
    return sum(1 for axis in kernel if axis in inputs)


class LoRAProjection(keras.layers.Layer):
    """A frozen projection plus a trainable low-rank update of the same input -> output map."""

    def __init__(self, base: keras.layers.Layer, rank: int, alpha: float, **kwargs):
        super().__init__(name=f"{base.name}_lora", dtype=quantized_base.float_policy(base), **kwargs)
        self.base, self.rank, self.alpha = base, rank, alpha
        shape = tuple(base.kernel.shape)
        k = _split(base)
        self.in_shape, self.out_shape = shape[:k], shape[k:]
        self.lora_a = self.add_weight(name="lora_a", shape=(math.prod(self.in_shape), rank),
                                      initializer=keras.initializers.HeUniform())
        self.lora_b = self.add_weight(name="lora_b", shape=(rank, math.prod(self.out_shape)),
                                      initializer="zeros")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def call(self, x):
        k = len(self.in_shape)
        lead = keras.ops.shape(x)[: len(x.shape) - k]
        flat = keras.ops.reshape(x, (-1, math.prod(self.in_shape)))
        update = keras.ops.matmul(keras.ops.matmul(flat, self.lora_a), self.lora_b) * self.scale
        return self.base(x) + keras.ops.reshape(update, (*lead, *self.out_shape))

    def merged_kernel(self):
        """W + scale * A B in W's [*in, *out] shape (W dequantized when the base is int8/int4): the
        base layer alone then computes the adapted map."""
        delta = keras.ops.matmul(self.lora_a, self.lora_b) * self.scale
        kernel = quantized_base.float_kernel(self.base, self.in_shape, self.out_shape)
        return kernel + keras.ops.reshape(delta, (*self.in_shape, *self.out_shape))


def _slots(backbone, targets: list[str]) -> list[tuple]:
    """(owner layer, attribute) of every targeted projection in every transformer block."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise FlagError(f"--lora_targets: unknown {unknown or 'empty list'}; choose from {sorted(TARGETS)}")
    slots, seen = [], set()
    for block in backbones.transformer_layers(backbone):
        for name in targets:
            owner_name, attribute = TARGETS[name]
            owner = getattr(block, owner_name, None) if owner_name else block
            layer = getattr(owner, attribute, None) if owner is not None else None
            if layer is None or not hasattr(layer, "kernel"):
                raise FlagError(f"--lora_targets={name}: {block.name} has no {attribute} projection; "
                                "LoRA supports keras-hub's encoder blocks and "
                                 "llama/gpt2-style decoder blocks")
            if (id(owner), attribute) not in seen:  # up = ffn_in, down = ffn_out
                seen.add((id(owner), attribute))
                slots.append((owner, attribute))
            if name in CROSS and getattr(block, CROSS[name][0], None) is not None:
                slots.append((getattr(block, CROSS[name][0]), attribute))
    return slots


def _has(block, name: str) -> bool:
    owner_name, attribute = TARGETS[name]
    owner = getattr(block, owner_name, None) if owner_name else block
    return owner is not None and hasattr(getattr(owner, attribute, None), "kernel")


def resolve_targets(backbone, config) -> tuple[list[str], str]:
    """The projections --lora_targets names, and why: the flag, or the task's default (auto)."""
    targets = list(config.lora_targets)
    if targets != ["auto"]:
        if "auto" in targets:
            raise FlagError(f"--lora_targets={','.join(targets)}: auto stands alone")
        return targets, "--lora_targets"
    if config.task not in DECODER_TASKS:
        return list(ENCODER_DEFAULT), f"default for --task={config.task} (encoder: query,value)"
    blocks = backbones.transformer_layers(backbone)
    # every projection the first block has (all blocks of a kft backbone are alike; _slots checks)
    found = [name for name in ALL_LINEAR if blocks and _has(blocks[0], name)]
    if not found:
        raise FlagError(f"--lora_targets=auto: {type(backbone).__name__}'s blocks have none of the "
                        f"projections LoRA wraps ({', '.join(ALL_LINEAR)}); name them with --lora_targets")
    return found, f"default for --task={config.task} (every linear projection of a block)"


def apply(backbone, config, vocabulary=None):
    if config.lora_rank < 1:
        raise FlagError(f"--lora_rank={config.lora_rank}: must be at least 1")
    targets, source = resolve_targets(backbone, config)
    slots = _slots(backbone, targets)
    for variable in backbone.weights:
        variable.trainable = False
    for owner, attribute in slots:
        wrapper = LoRAProjection(getattr(owner, attribute), config.lora_rank, config.lora_alpha)
        backbones.replace_sublayer(owner, attribute, wrapper)
    return backbone, {"method": "lora", "rank": config.lora_rank, "alpha": config.lora_alpha,
            "targets": targets, "targets_source": source, "adapted_layers": len(slots)}


def merge(backbone) -> int:
    """Folds every LoRA update into its base kernel and removes the wrappers; returns how many.

    The merged backbone computes the same function with the base model's cost: this is what the
    export serves.
    """
    merged = 0
    for block in backbones.transformer_layers(backbone):
        for owner_name, attribute in list(TARGETS.values()) + list(CROSS.values()):
            owner = getattr(block, owner_name, None) if owner_name else block
            layer = getattr(owner, attribute, None) if owner is not None else None
            if isinstance(layer, LoRAProjection):
                if layer.base.quantization_mode is None:
                    layer.base.kernel.assign(layer.merged_kernel())
                    backbones.replace_sublayer(owner, attribute, layer.base)
                else:  # a quantized base: served as the float layer it computes with, adapter folded in
                    kernel = np.asarray(layer.merged_kernel())
                    backbones.replace_sublayer(owner, attribute, quantized_base.dequantized(layer.base, kernel))
                merged += 1
    return merged
