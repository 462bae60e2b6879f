"""BitFit (Ben Zaken et al., 2022): only the backbone's bias terms train, with the task head.

Biases here are the additive terms of every dense projection and of every LayerNorm (its offset);
the weights themselves stay exactly as pretrained.
"""

from __future__ import annotations

BIAS_SUFFIXES = ("/bias", "/beta")


def is_bias(variable) -> bool:
    return variable.path.endswith(BIAS_SUFFIXES)


def apply(backbone, config, vocabulary=None):
    kept = 0
    for variable in backbone.weights:
        variable.trainable = is_bias(variable)
        kept += int(variable.trainable)
    return backbone, {"method": "bitfit", "trainable": f"{kept} bias vectors of the backbone + the head"}
