"""Gradual magnitude pruning (Zhu & Gupta, 2017) of the transformer blocks' projection kernels.

Target sparsity at step t rises from 0 to s_f along s_f * (1 - (1 - t / t_end)^3), t_end =
--prune_end_fraction of the training steps, and holds from there. Every `frequency` steps each
kernel's mask is recomputed: its smallest-magnitude entries (the same share for every kernel, as
in Zhu & Gupta) become 0. A mask is applied as the kernel's Keras constraint, which the optimizer
applies after every update, so a pruned weight stays exactly 0 through each step (Adam's moments
would move it otherwise). The masks are not checkpointed: pruned weights are exactly 0, so a
resumed run recomputes them from the restored kernels at the restored step.

Embeddings, layer norms, biases and the head are not pruned. The export stores the zeros densely
(TensorFlow on CPU has no sparse-kernel speedup for these matmuls): pruning here buys a smaller
compressed file and a sparsity a sparse runtime could use, not speed; kft reports what it measures.
"""

from __future__ import annotations

import keras
import numpy as np
from absl import logging

from kft.models import backbones
from kft.config import FlagError


class MaskConstraint(keras.constraints.Constraint):
    """w -> w * mask, applied by the optimizer after each update."""

    def __init__(self, mask: keras.Variable):
        self.mask = mask

    def __call__(self, w):
        return w * keras.ops.cast(self.mask, w.dtype)


def prunable_kernels(backbone: keras.Model) -> list:
    """Kernels of the Dense/EinsumDense projections inside the transformer blocks."""
    kernels = []
    for block in backbones.transformer_layers(backbone):
        for layer in block._flatten_layers():
            if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and layer.trainable:
                kernels.append(layer.kernel)
    return kernels


def target_sparsity(step: int, final: float, end_step: int) -> float:
    if end_step <= 0:
        return final
    progress = min(1.0, step / end_step)
    return final * (1.0 - (1.0 - progress) ** 3)


def check_fractions(final: float, end_fraction: float) -> None:
    """Refuses a --prune_sparsity or --prune_end_fraction outside its range (before any training)."""
    if not 0.0 <= final < 1.0:
        raise FlagError(f"--prune_sparsity={final}: must be in [0, 1)")
    if not 0.0 < end_fraction <= 1.0:
        raise FlagError(f"--prune_end_fraction={end_fraction}: must be in (0, 1]")


class Pruner:
    """Owns the masks of a backbone's kernels; `update(step)` recomputes them on schedule."""

    def __init__(self, backbone: keras.Model, final: float, total_steps: int, end_fraction: float):
        check_fractions(final, end_fraction)
        self.kernels = prunable_kernels(backbone)
        if not self.kernels:
            raise FlagError("--prune_sparsity: the backbone has no trainable projection kernels "
                            "(pruning needs --method=full)")
        self.final = final
        self.end_step = int(round(end_fraction * total_steps))
        self.frequency = max(1, self.end_step // 50)
        self.masks = []
        for kernel in self.kernels:
            mask = keras.Variable(np.ones(kernel.shape, np.float32), trainable=False, dtype="float32",
                                  name="prune_mask")
            kernel.constraint = MaskConstraint(mask)
            self.masks.append(mask)
        self.applied = None

    def update(self, step: int, force: bool = False) -> None:
        """Recomputes the masks if the schedule says so at `step` (or `force`), and applies them."""
        due = force or step % self.frequency == 0 or (step >= self.end_step and self.applied != self.final)
        sparsity = target_sparsity(step, self.final, self.end_step)
        if not due or sparsity == self.applied:
            return
        for kernel, mask in zip(self.kernels, self.masks):
            w = np.abs(np.asarray(kernel.numpy()))
            k = int(round(sparsity * w.size))
            m = np.ones(w.size, np.float32)
            if k:
                m[np.argpartition(w.ravel(), k - 1)[:k]] = 0.0
            m = m.reshape(w.shape)
            mask.assign(m)
            kernel.assign(kernel.numpy() * m)
        self.applied = sparsity
        logging.info("pruning: step %d, target sparsity %.3f of %d kernels", step, sparsity, len(self.kernels))

    def report(self) -> dict:
        """The measured share of exact zeros per pruned kernel and over all of them."""
        per_layer, zeros, total = {}, 0, 0
        for kernel in self.kernels:
            w = np.asarray(kernel.numpy())
            z = int(np.sum(w == 0))
            per_layer[kernel.path] = round(z / w.size, 4)
            zeros, total = zeros + z, total + w.size
        return {"target": self.final, "end_step": self.end_step, "update_every_steps": self.frequency,
                "measured": round(zeros / total, 4), "pruned_parameters": total, "per_layer": per_layer}
