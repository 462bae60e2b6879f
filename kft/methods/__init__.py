"""Tuning methods: each module decides which backbone weights train, applied before compile.

Every method module exposes `apply(backbone, config) -> dict` returning a short description for logs
and metrics. New methods (LoRA, prompt or prefix tuning, BitFit) are sibling modules.
"""

from kft.methods import freeze

METHODS = {"full": freeze, "freeze": freeze}


def apply(backbone, config) -> dict:
    return METHODS[config.method].apply(backbone, config)
