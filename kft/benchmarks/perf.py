"""What the benchmark measures besides wall time: this machine's matmul rate, model FLOPs, memory.

Compute efficiency = model FLOPs spent on real (non-pad) tokens / training time / the fp32 matmul
rate measured on this machine. Padding, recomputation and framework overhead all lower it.
"""

from __future__ import annotations

import math
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


def tensorflow_matmul_rate(sizes=(1024, 2048, 3072), repeats: int = 4, dtype: str = "float32") -> dict:
    """Best square-matmul FLOP/s TensorFlow reaches here (oneDNN on x86 CPUs) in `dtype`."""
    import tensorflow as tf

    mm = tf.function(lambda a, b: tf.matmul(a, b))

    def run(n, k):
        a = tf.cast(tf.random.normal([n, n], seed=1), dtype)
        b = tf.cast(tf.random.normal([n, n], seed=2), dtype)
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


def kernel_matmuls(model, hidden: int) -> dict[tuple[int, int], int]:
    """(inputs, outputs) -> count of the non-embedding kernels, as the matmuls a token goes through.

    A rank-3 attention kernel is [hidden, heads, head_dim] (query/key/value) or [heads, head_dim,
    hidden] (output); either is a hidden x hidden matmul over the flattened axes.
    """
    shapes: dict[tuple[int, int], int] = {}
    for w in model.weights:
        if "embedding" in w.path or "bias" in w.path or "float" not in str(w.dtype) or len(w.shape) < 2:
            continue  # (attention biases are [heads, head_dim])
        dims = [int(d) for d in w.shape]
        if len(dims) == 2:
            key = (dims[0], dims[1])
        elif dims[0] == hidden:
            key = (dims[0], int(np.prod(dims[1:])))
        else:
            key = (int(np.prod(dims[:-1])), dims[-1])
        shapes[key] = shapes.get(key, 0) + 1
    return shapes


def _best_seconds(fn, repeats: int = 5, calls: int = 3) -> float:
    fn()  # trace and warm up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn()
        np.asarray(out)
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def matmul_seconds(kernels: dict[tuple[int, int], int], rows: int, dtype: str = "float32") -> float:
    """Time of one training step's kernel matmuls at `rows` tokens: for each kernel the forward
    product and the two backward ones (input and weight gradients), run back to back."""
    import tensorflow as tf

    pairs = [(tf.cast(tf.random.normal([rows, a], seed=1), dtype),
              tf.cast(tf.random.normal([a, b], seed=2), dtype),
              tf.cast(tf.random.normal([rows, b], seed=3), dtype)) for a, b in kernels]

    @tf.function
    def one_each():
        out = []
        for x, w, dy in pairs:
            out += [tf.matmul(x, w)[0, 0], tf.matmul(dy, w, transpose_b=True)[0, 0],
                    tf.matmul(x, dy, transpose_a=True)[0, 0]]
        return tf.stack([tf.cast(v, tf.float32) for v in out])

    count = list(kernels.values())
    each = _best_seconds(one_each)
    # one_each runs every distinct shape once; scale by how many kernels of each shape exist.
    flops = [6.0 * rows * a * b for a, b in kernels]
    return each * sum(f * c for f, c in zip(flops, count)) / sum(flops)


def adam_seconds(shapes: list[tuple[int, ...]]) -> float:
    """One pass of TensorFlow's fused Adam kernel over variables of these shapes (float32): the
    least memory traffic an Adam step needs (read gradient, weights and both moments; write three)."""
    import tensorflow as tf

    state = [(tf.Variable(tf.zeros(s)), tf.Variable(tf.zeros(s)), tf.Variable(tf.zeros(s)),
              tf.fill(s, 1e-3)) for s in shapes]

    @tf.function
    def step():
        for var, m, v, g in state:
            tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=0.9,
                                         beta2_power=0.999, lr=1e-5, beta1=0.9, beta2=0.999,
                                         epsilon=1e-6, grad=g)
        return state[0][0].read_value()[..., :1]

    return _best_seconds(step)


def training_floor(kernels: dict[tuple[int, int], int], step_rows: np.ndarray, attention_flops: float,
                   variable_shapes: list[tuple[int, ...]], dtype: str = "float32") -> dict:
    """The least time a run of these steps could take on this machine: every step's kernel matmuls
    at their real shapes and this machine's measured speed for them, attention's FLOPs at the same
    rate, and one fused Adam pass per step. Everything else a step does (layer norms, activations,
    dropout, softmax, gradient clipping, weight decay, framework overhead) counts as zero.

    Args:
      kernels: from `kernel_matmuls`.
      step_rows: tokens (padded positions) each training step multiplies, one entry per step.
      attention_flops: the run's attention FLOPs (scores and weighted sums, forward and backward).
      variable_shapes: the trainable variables' shapes (what Adam updates each step).
      dtype: the compute dtype of the matmuls.
    """
    rows, counts = np.unique(np.asarray(step_rows, np.int64), return_counts=True)
    matmul = 0.0
    kernel_flops = 0.0
    for n, c in zip(rows, counts):
        matmul += c * matmul_seconds(kernels, int(n), dtype)
        kernel_flops += c * sum(6.0 * n * a * b * k for (a, b), k in kernels.items())
    attention = attention_flops / (kernel_flops / matmul) if matmul else 0.0
    adam = adam_seconds(variable_shapes) * int(counts.sum())
    return {"matmul_seconds": matmul, "attention_seconds": attention, "adam_seconds": adam,
            "floor_seconds": matmul + attention + adam, "steps": int(counts.sum()),
            "kernel_rate": kernel_flops / matmul if matmul else None, "dtype": dtype}
