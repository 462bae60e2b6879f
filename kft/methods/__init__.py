"""Tuning methods: each module decides which backbone weights train, applied before compile.

Every method module exposes `apply(backbone, config, vocabulary) -> (backbone, info)`: it freezes
what must not train, may add weights (LoRA factors, prompt or prefix vectors), and returns the
backbone to build the task model on (the same object, or a rebuilt graph sharing its layers) and a
short description for logs and metrics. `prepare_export` turns training-time structure into the
plain function that is served.
"""

from kft.config import FlagError
from kft.models import attention
from kft.methods import bitfit, freeze, lora, prefix, prompt, quantized_base

METHODS = {"full": freeze, "freeze": freeze, "lora": lora, "prompt": prompt, "prefix": prefix,
           "bitfit": bitfit}


def apply(backbone, config, vocabulary: list[str] | None = None):
    """Returns (backbone to build the model on, description); `vocabulary` seeds prompt vectors."""
    if config.method not in ("full", "freeze") and config.freeze_layers:
        raise FlagError(f"--freeze_layers={config.freeze_layers} applies to --method=freeze, not "
                        f"--method={config.method}")
    quantized_base.check(config)
    backbone, info = METHODS[config.method].apply(backbone, config, vocabulary)
    mode = getattr(config, "base_quantization", "none")
    if mode != "none":  # after the method wraps its targets: a LoRA wrapper reads the float kernel's shape
        info["base_quantization"] = quantized_base.apply(backbone, mode)
    return backbone, info


def prepare_export(backbone, config) -> None:
    """Method-specific changes before export that keep the function: LoRA updates merged into the
    base kernels, a prefix reparameterisation folded into plain vectors, keras-hub's own attention
    back in llama-family blocks (the memory-efficient kernel is a training-time choice)."""
    attention.restore_attention(backbone)
    if config.method == "lora":
        lora.merge(backbone)
    elif config.method == "prefix":
        prefix.fold(backbone)
