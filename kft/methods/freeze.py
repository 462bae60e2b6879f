"""Full fine-tuning and layer freezing.

`--freeze_layers=N` freezes the embeddings and the lowest N transformer blocks; -1 freezes the whole
backbone so only the head trains. With `--method=full`, N must be 0.
"""

from __future__ import annotations

from kft import backbones


class MethodError(ValueError):
    """Tuning-method flags that contradict each other or the backbone."""


def apply(backbone, config) -> dict:
    blocks = backbones.transformer_layers(backbone)
    n = config.freeze_layers
    if config.method == "full" and n != 0:
        raise MethodError(f"--method=full trains every layer but --freeze_layers={n}; "
                          "use --method=freeze (or drop --freeze_layers)")
    if n < -1 or n > len(blocks):
        raise MethodError(f"--freeze_layers={n} but the backbone has {len(blocks)} transformer layers; "
                          f"use 0..{len(blocks)}, or -1 to freeze the whole backbone")
    if n == -1:
        backbone.trainable = False
        return {"method": config.method, "frozen": "whole backbone"}
    if n > 0:
        for layer in backbones.embedding_layers(backbone) + blocks[:n]:
            layer.trainable = False
    return {"method": config.method, "frozen": f"embeddings + {n} of {len(blocks)} layers" if n else "none"}
