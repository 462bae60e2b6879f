"""What the benchmark measures besides wall time: this machine's matmul rate, model FLOPs, memory.

Compute efficiency = model FLOPs spent on real (non-pad) tokens / training time / the fp32 matmul
rate measured on this machine. Padding, recomputation and framework overhead all lower it.
"""

from __future__ import annotations

import resource
import time

import numpy as np


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _best_rate(matmul, sizes, repeats: int) -> dict:
    rates = {}
    for n in sizes:
        matmul(n, 1)  # warm-up: allocation, kernel selection
        best = min(matmul(n, repeats) for _ in range(3)) / repeats
        rates[str(n)] = 2.0 * n ** 3 / best
    return {"flops_per_second": max(rates.values()), "by_size": rates}


def tensorflow_matmul_rate(sizes=(1024, 2048, 3072), repeats: int = 4) -> dict:
    """Best fp32 square-matmul FLOP/s TensorFlow reaches here (oneDNN on x86 CPUs)."""
    import tensorflow as tf

    mm = tf.function(lambda a, b: tf.matmul(a, b))

    def run(n, k):
        a, b = tf.random.normal([n, n], seed=1), tf.random.normal([n, n], seed=2)
        mm(a, b).numpy()
        t = time.perf_counter()
        for _ in range(k):
            c = mm(a, b)
        c.numpy()
        return time.perf_counter() - t

    return _best_rate(run, sizes, repeats)


def torch_matmul_rate(sizes=(1024, 2048, 3072), repeats: int = 4) -> dict:
    """The same measurement with PyTorch (its CPU BLAS), for the Hugging Face row's context."""
    import torch

    def run(n, k):
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time.perf_counter()
        for _ in range(k):
            a @ b
        return time.perf_counter() - t

    return _best_rate(run, sizes, repeats)


def non_embedding_parameters(model) -> int:
    """Parameters outside the embedding tables: the ones each token's compute is proportional to."""
    return int(sum(np.prod(w.shape) for w in model.weights
                   if "embedding" not in w.path and "float" in str(w.dtype)))


def training_flops(length_sum: float, length_square_sum: float, parameters: int, layers: int,
                   hidden: int) -> float:
    """Model FLOPs of training on sequences with the given real lengths (forward + backward).

    6 FLOPs per parameter per token (2 forward, 4 backward), plus self-attention's scores and
    weighted sum: 4·L²·hidden per layer forward, times 3 with the backward pass.
    """
    return 6.0 * parameters * length_sum + 12.0 * layers * hidden * length_square_sum
