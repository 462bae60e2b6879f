"""Full fine-tuning and layer freezing.

`--freeze_layers=N` freezes the embeddings and the lowest N transformer blocks; -1 freezes the whole
backbone so only the head trains. A nonzero N selects this method even under the default --method=full.
"""

from __future__ import annotations

from kft.models import backbones
from kft.config import FlagError


def apply(backbone, config, vocabulary=None):
    blocks = backbones.transformer_layers(backbone)
    n = config.freeze_layers
    if n < -1 or n > len(blocks):
        raise FlagError(f"--freeze_layers={n} but the backbone has {len(blocks)} transformer layers; "
                        f"use 0..{len(blocks)}, or -1 to freeze the whole backbone")
    if config.method == "freeze" and n == 0:
        raise FlagError("--method=freeze needs --freeze_layers=N (1..%d) or -1 for the whole backbone"
                        % len(blocks))
    if n == -1:
        backbone.trainable = False
        return backbone, {"method": "freeze", "frozen": "whole backbone"}
    if n == 0:
        return backbone, {"method": "full", "frozen": "none"}
    for layer in backbones.embedding_layers(backbone) + blocks[:n]:
        layer.trainable = False
    return backbone, {"method": "freeze", "frozen": f"embeddings + {n} of {len(blocks)} layers"}
