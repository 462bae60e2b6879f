"""Post-training weight quantisation with Keras' own `Model.quantize`, for serving.

Modes (`--quantize`):
  int8          int8 weights with a per-output-channel scale; activations stay float (Keras'
                Int8QuantizationConfig with no activation quantizer). The matmul dequantizes the
                kernel, so a CPU serves at about float32's speed with a quarter of the weight bytes.
  int8_dynamic  Keras' default int8: activations are also quantized per call and the matmuls run on
                int8. Stock TensorFlow has no fast int8 matmul on CPU: measured 7x slower than float32
                at batch 64 on the demo model (PERFORMANCE.md); offered for accelerators that have one.
  int4          Keras' default int4 (packed int4 weights, sub-channel scales).
Embeddings are quantized too (Keras quantizes Embedding and keras-hub's ReversibleEmbedding);
position embeddings and layer norms stay float32.
"""

from __future__ import annotations

import warnings

import keras

MODES = ("none", "int8", "int8_dynamic", "int4")


def quantize(model: keras.Model, mode: str) -> dict:
    """Quantizes `model` in place; returns which layers changed (by class) and the weight bytes."""
    from kft.models import savedmodel as export

    before = export.weight_bytes(model)
    with warnings.catch_warnings():
        # Keras warns once for every layer without a `quantize` method (Softmax, Add, ...).
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method.*")
        if mode == "int8":
            model.quantize(config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None))
        elif mode == "int8_dynamic":
            model.quantize("int8")
        elif mode == "int4":
            model.quantize("int4")
        else:
            raise ValueError(f"unknown quantization mode {mode!r}; choose from {MODES[1:]}")
    layers: dict[str, int] = {}
    for layer in model._flatten_layers():
        if getattr(layer, "quantization_mode", None):
            layers[type(layer).__name__] = layers.get(type(layer).__name__, 0) + 1
    return {"mode": mode, "quantized_layers": layers, "float32_weight_bytes": before,
            "weight_bytes": export.weight_bytes(model)}


def serving_latency(path: str, texts: list[str], requests: int = 100, batches: int = 10) -> dict:
    """The export's `serving_default` timed in this process on raw texts: batch-1 p50/p99 and
    batch-64 throughput (a quick reading for metrics.json; `kft.bench --mode=serve` measures the
    same in a fresh process, with more requests)."""
    import time

    import numpy as np
    import tensorflow as tf

    from kft.models import savedmodel as export

    serve = export.load(path).signatures["serving_default"]
    rng = np.random.default_rng(0)
    for i in range(5):  # the first calls trace and warm up
        serve(text=tf.constant([texts[i % len(texts)]]))
        serve(text=tf.constant([texts[j % len(texts)] for j in range(64)]))
    single = []
    for i in rng.integers(0, len(texts), requests):
        t = time.perf_counter()
        [v.numpy() for v in serve(text=tf.constant([texts[i]])).values()]
        single.append(time.perf_counter() - t)
    many = []
    for _ in range(batches):
        batch = [texts[i] for i in rng.integers(0, len(texts), 64)]
        t = time.perf_counter()
        [v.numpy() for v in serve(text=tf.constant(batch)).values()]
        many.append(time.perf_counter() - t)
    single = np.asarray(single) * 1e3
    return {"batch_1_p50_ms": round(float(np.percentile(single, 50)), 2),
            "batch_1_p99_ms": round(float(np.percentile(single, 99)), 2),
            "batch_64_texts_per_second": round(64 * batches / float(np.sum(many)), 1),
            "requests": requests, "batches_of_64": batches}
