"""Tuning methods: each module decides which backbone weights train, applied before compile.

Every method module exposes `apply(backbone, config) -> dict` returning a short description for logs
and metrics. New methods (LoRA, prompt or prefix tuning, BitFit) are sibling modules.
"""

from kft.config import FlagError
from kft.methods import bitfit, freeze, lora

METHODS = {"full": freeze, "freeze": freeze, "lora": lora, "bitfit": bitfit}


def apply(backbone, config) -> dict:
    if config.method in ("lora", "bitfit") and config.freeze_layers:
        raise FlagError(f"--freeze_layers={config.freeze_layers} applies to --method=freeze, not "
                        f"--method={config.method}")
    return METHODS[config.method].apply(backbone, config)


def prepare_export(backbone, config) -> None:
    """Method-specific changes before export that keep the function (LoRA: merge the updates)."""
    if config.method == "lora":
        lora.merge(backbone)
