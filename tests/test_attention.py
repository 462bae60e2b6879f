"""kft.models.attention: blockwise attention with an O(sequence) backward pass.

Outputs and gradients w.r.t. query, key and value are compared with attention formed plainly
(softmax(Q K^T * scale + mask) V over the whole [batch, heads, n, n] scores), and a tiny llama
backbone with its attention switched is compared with the same backbone before the switch.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kft.models import attention

B, N, H, KV, D = 2, 70, 4, 2, 8
TOL = 1e-5


def _inputs(n=N, heads=H, kv=KV, dtype=tf.float32, seed=0, b=B):
    rng = np.random.default_rng(seed)
    q = tf.constant(rng.normal(size=(b, n, heads, D)), dtype)
    k = tf.constant(rng.normal(size=(b, n, kv, D)), dtype)
    v = tf.constant(rng.normal(size=(b, n, kv, D)), dtype)
    return q, k, v


def _with_grads(fn, q, k, v, **kwargs):
    """(output, dq, dk, dv) of a fixed weighted sum of the output (weights in [-1, 1])."""
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = fn(q, k, v, **kwargs)
        flat = tf.reshape(tf.cast(out, tf.float32), [-1])
        loss = tf.reduce_sum(flat * tf.cos(tf.range(tf.size(flat), dtype=tf.float32)))
    return [out] + tape.gradient(loss, [q, k, v])


def _max_diffs(got, want):
    return [float(tf.reduce_max(tf.abs(tf.cast(a, tf.float32) - tf.cast(b, tf.float32))))
            for a, b in zip(got, want)]


def _check(block_size=16, inputs=None, **mask_args):
    q, k, v = inputs or _inputs()
    got = _with_grads(attention.flash_attention, q, k, v, block_size=block_size, **mask_args)
    want = _with_grads(attention.reference_attention, q, k, v, **mask_args)
    diffs = _max_diffs(got, want)
    assert max(diffs) <= TOL, diffs
    for t in got:
        assert bool(tf.reduce_all(tf.math.is_finite(t)))
    return got


def _segments():
    seg = np.zeros((B, N), np.int32)
    seg[0, :25], seg[0, 25:47], seg[0, 47:64] = 1, 2, 3  # three examples, then padding
    seg[1, :9], seg[1, 9:68] = 1, 2
    return seg


def test_causal():
    _check()


def test_causal_right_padding():
    padding = np.ones((B, N), np.int32)
    padding[0, 50:] = 0
    padding[1, 63:] = 0
    _check(key_padding=padding)


def test_packed_segments_and_padding_queries():
    seg = _segments()
    out, dq, dk, dv = _check(key_padding=seg > 0, segment_ids=seg)
    # padding queries (segment 0) see no key: output 0 and no gradient
    assert float(tf.reduce_max(tf.abs(out[0, 64:]))) == 0.0
    assert float(tf.reduce_max(tf.abs(dq[0, 64:]))) == 0.0
    # padding keys get no gradient either
    assert float(tf.reduce_max(tf.abs(dk[0, 64:]))) == 0.0
    assert float(tf.reduce_max(tf.abs(dv[0, 64:]))) == 0.0


def test_small_segment_example_and_no_causal():
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0]] * B, np.int32)
    inputs = _inputs(n=10)
    _check(block_size=4, inputs=inputs, key_padding=seg > 0, segment_ids=seg)
    _check(block_size=4, inputs=inputs, causal=False, key_padding=seg > 0, segment_ids=seg)


def test_grouped_query_and_multi_head_shapes():
    _check(inputs=_inputs(heads=6, kv=2))  # 3 query heads per kv head
    _check(inputs=_inputs(heads=4, kv=1))  # multi-query
    _check(inputs=_inputs(heads=3, kv=3))  # plain multi-head


def test_length_not_multiple_of_block_and_block_sizes():
    for block_size in (7, 64, 128):  # 70 keys: 10 blocks, a partial block, one block larger than n
        _check(block_size=block_size)


def test_scale_sliding_window_dense_mask_and_mask_fn():
    _check(scale=0.3)
    _check(sliding_window=9)
    rng = np.random.default_rng(3)
    dense = rng.random((B, N, N)) < 0.6
    dense[1, 5] = False  # one fully masked row
    _check(mask=dense)

    def every_other(q_pos, k_pos):  # keys of the query's own parity
        return tf.equal(q_pos[:, None] % 2, k_pos[None, :] % 2)[None]

    _check(mask_fn=every_other)


def test_inside_tf_function_with_unknown_length():
    seg = _segments()
    spec = [tf.TensorSpec([None, None, H, D]), tf.TensorSpec([None, None, KV, D]),
            tf.TensorSpec([None, None, KV, D]), tf.TensorSpec([None, None], tf.int32)]

    @tf.function(input_signature=spec)
    def step(q, k, v, seg):
        return _with_grads(attention.flash_attention, q, k, v, block_size=16,
                           key_padding=seg > 0, segment_ids=seg)

    q, k, v = _inputs()
    for n in (N, 33):  # one trace, two lengths
        got = step(q[:, :n], k[:, :n], v[:, :n], tf.constant(seg[:, :n]))
        want = _with_grads(attention.reference_attention, q[:, :n], k[:, :n], v[:, :n],
                           key_padding=seg[:, :n] > 0, segment_ids=seg[:, :n])
        assert max(_max_diffs(got, want)) <= TOL
    assert len(step._list_all_concrete_functions()) == 1


def test_under_xla():
    q, k, v = _inputs(n=40)
    padding = np.ones((B, 40), np.int32)
    padding[1, 30:] = 0

    @tf.function(jit_compile=True)
    def step(q, k, v, padding):
        return _with_grads(attention.flash_attention, q, k, v, block_size=16, key_padding=padding)

    got = step(q, k, v, tf.constant(padding))
    want = _with_grads(attention.reference_attention, q, k, v, key_padding=padding)
    assert max(_max_diffs(got, want)) <= TOL


def test_bfloat16_inputs():
    q, k, v = _inputs(dtype=tf.bfloat16)
    got = _with_grads(attention.flash_attention, q, k, v, block_size=16)
    assert all(t.dtype == tf.bfloat16 for t in got)
    want = _with_grads(attention.reference_attention, *(tf.cast(t, tf.float32) for t in (q, k, v)))
    # float32 accumulators: only the final rounding to bfloat16 (8 bits of mantissa) differs
    for a, b in zip(got, want):
        err = tf.abs(tf.cast(a, tf.float32) - b)
        assert float(tf.reduce_max(err / (tf.abs(b) + 1.0))) < 2e-2


# -- the backward pass keeps no [n, n] tensor ---------------------------------------------------------
#
# Method: trace loss-and-gradient as one graph with static shapes and collect the "saved" tensors:
# every tensor made by an op of the forward pass (the ops that exist before tape.gradient is called)
# that an op of the gradient computation reads. Those are exactly what must stay alive between the
# two passes. Their sizes are compared with n * n; the same check on the plain attention finds the
# [b, h, n, n] probabilities, so the check does detect an n^2 residual. Block-sized temporaries
# ([b, h, n, block]) exist only inside the while loops' bodies and die with each iteration. This
# covers graph mode (tf.function, the training step); eager mode is checked by measuring the CPU
# allocator's peak below.

def _saved_tensors(fn, n, heads=6, kv=2, b=1, **kwargs):
    spec = [tf.TensorSpec([b, n, heads, D]), tf.TensorSpec([b, n, kv, D]), tf.TensorSpec([b, n, kv, D])]
    forward = set()

    @tf.function(input_signature=spec)
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            loss = tf.reduce_sum(fn(q, k, v, **kwargs) ** 2)
        forward.update(op.name for op in tf.compat.v1.get_default_graph().get_operations())
        return tape.gradient(loss, [q, k, v])

    graph = step.get_concrete_function().graph
    backward = [op for op in graph.get_operations() if op.name not in forward]
    assert backward and forward
    saved = {t.name: t for op in backward for t in op.inputs if t.op.name in forward}
    every = [t for op in graph.get_operations() for t in op.outputs]
    return saved, every


def _elements(t):
    return t.shape.num_elements() or 0 if t.shape.rank is not None and t.shape.is_fully_defined() else 0


def test_backward_keeps_only_linear_size_tensors():
    n, block = 256, 32
    saved, every = _saved_tensors(attention.flash_attention, n, block_size=block)
    biggest = max(_elements(t) for t in saved.values())
    assert biggest <= 1 * 6 * n * D, {k: t.shape for k, t in saved.items()}  # one [b, n, heads, d]
    # nothing at the graph's top level (outside the loop bodies) is n^2 sized either
    assert max(_elements(t) for t in every) < n * n

    saved, _ = _saved_tensors(attention.reference_attention, n)
    assert max(_elements(t) for t in saved.values()) >= 6 * n * n  # the plain kernel keeps [b, h, n, n]


def _peak_growth(fn, q, k, v, **kwargs):
    """Bytes the CPU allocator's peak rose by while computing fn's gradients eagerly."""
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = tf.config.experimental.get_memory_info("CPU:0")["current"]
    grads = _with_grads(fn, q, k, v, **kwargs)
    _ = [g.numpy() for g in grads]
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - start


def test_eager_gradient_peak_memory_is_not_quadratic():
    """In eager mode a GradientTape records what runs inside a custom gradient's forward function;
    the kernel must not let it keep the blocks' probabilities. Measured with the CPU allocator's
    peak (tf.config.experimental.get_memory_info), skipped where TensorFlow does not track it."""
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, tf.errors.OpError):
        pytest.skip("no CPU memory statistics in this TensorFlow build")
    growth = {}
    for n in (512, 1024):
        q, k, v = _inputs(n=n, heads=4, kv=2, b=1)
        growth[n] = (_peak_growth(attention.flash_attention, q, k, v, block_size=64),
                     _peak_growth(attention.reference_attention, q, k, v))
    flash_ratio = growth[1024][0] / growth[512][0]
    plain_ratio = growth[1024][1] / growth[512][1]
    assert plain_ratio > 3.2, growth  # the measurement sees the quadratic tensors
    assert flash_ratio < 2.5, growth  # linear: twice the length, about twice the memory
    assert growth[1024][1] > 4 * 1024 * 1024 * 4  # one [1, 4, n, n] float32 tensor
    assert growth[1024][0] < growth[1024][1] / 4, growth


# -- wiring into a keras-hub llama backbone ----------------------------------------------------------

def _backbone(llama_folder):
    from kft.models import backbones

    return backbones.load_decoder(llama_folder).backbone


def _logits_and_grads(backbone, ids, padding, segments=None, blocks=None, training=False):
    """Logits at real tokens and the gradients of a training-like loss on them (mean cross-entropy
    against fixed random targets at real tokens) w.r.t. every trainable weight."""
    embedding = backbone.token_embedding
    valid = tf.cast(padding, tf.float32)
    targets = tf.random.stateless_uniform(tf.shape(ids), [1, 2], 0, embedding.input_dim, tf.int32)
    with tf.GradientTape() as tape:
        if segments is None and blocks is None:
            hidden = backbone({"token_ids": ids, "padding_mask": padding}, training=training)
        else:  # packed rows, as kft/tasks/causal_lm/model.py runs the blocks
            x = embedding(ids)
            for block in backbone.transformer_layers:
                if blocks == "dense":
                    same = attention.segment_dense_mask(segments)
                    x = block(x, decoder_padding_mask=padding, decoder_attention_mask=same, training=training)
                else:
                    x = attention.call_block(block, x, padding, segments, training=training)
            hidden = backbone.layer_norm(x)
        logits = embedding(hidden, reverse=True) * valid[:, :, None]
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
        loss = tf.reduce_sum(ce * valid) / tf.reduce_sum(valid)
    weights = backbone.trainable_weights
    return logits, tape.gradient(loss, weights), [w.path for w in weights]


def _compare(before, after):
    (l0, g0, names), (l1, g1, _) = before, after
    assert float(tf.reduce_max(tf.abs(l0 - l1))) <= TOL
    for name, a, b in zip(names, g0, g1):
        assert a is not None and b is not None, name
        a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
        assert float(tf.reduce_max(tf.abs(a - b))) <= TOL, name


def test_llama_backbone_same_logits_and_gradients(llama_folder, monkeypatch):
    backbone = _backbone(llama_folder)
    calls = []
    kernel = attention.flash_attention
    monkeypatch.setattr(attention, "flash_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    rng = np.random.default_rng(0)
    n = 37
    ids = tf.constant(rng.integers(3, 200, size=(2, n)), tf.int32)
    padding = np.ones((2, n), np.int32)
    padding[1, 29:] = 0
    padding = tf.constant(padding)
    seg = np.zeros((2, n), np.int32)
    seg[0, :11], seg[0, 11:30], seg[0, 30:35] = 1, 2, 3
    seg[1, :29] = 1
    packed_padding = tf.constant((seg > 0).astype(np.int32))
    seg = tf.constant(seg)

    plain = _logits_and_grads(backbone, ids, padding)
    packed = _logits_and_grads(backbone, ids, packed_padding, seg, blocks="dense")

    layers = len(backbone.transformer_layers)
    assert attention.use_memory_efficient_attention(backbone, block_size=16) == layers
    assert attention.use_memory_efficient_attention(backbone, block_size=16) == layers  # idempotent
    assert not calls
    _compare(plain, _logits_and_grads(backbone, ids, padding))
    assert len(calls) == layers  # the kernel ran in every block
    _compare(packed, _logits_and_grads(backbone, ids, packed_padding, seg))  # segment ids passed
    _compare(packed, _logits_and_grads(backbone, ids, packed_padding, seg, blocks="dense"))  # dense mask

    # inside tf.function with unknown length, as the training step runs it
    spec = [tf.TensorSpec([None, None], tf.int32)] * 2

    @tf.function(input_signature=spec)
    def traced(ids, padding):
        return _logits_and_grads(backbone, ids, padding)[:2]

    logits, grads = traced(ids, padding)
    _compare(plain, (logits, grads, plain[2]))

    # with gradient checkpointing (kft/training/recompute.py) on top, training calls
    from kft.training import recompute

    recompute.enable(backbone)
    _compare(plain, _logits_and_grads(backbone, ids, padding, training=True))
    _compare(packed, _logits_and_grads(backbone, ids, packed_padding, seg, training=True))

    assert attention.restore_attention(backbone) == layers
    calls.clear()
    _compare(packed, _logits_and_grads(backbone, ids, packed_padding, seg, blocks="dense"))
    assert not calls


def test_llama_generation_still_uses_the_cache(llama_folder):
    """Cached decoding goes through keras-hub's own attention and gives the same tokens."""
    from kft.models import backbones

    loaded = backbones.load_decoder(llama_folder)
    lm = loaded.causal_lm_class(backbone=loaded.backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    prompt = {"token_ids": np.array([[5, 9, 14, 20, 0, 0, 0, 0]], np.int32),
              "padding_mask": np.array([[1, 1, 1, 1, 0, 0, 0, 0]], bool)}
    before = lm.generate(prompt, stop_token_ids=None)
    attention.use_memory_efficient_attention(loaded.backbone)
    lm2 = loaded.causal_lm_class(backbone=loaded.backbone, preprocessor=None)
    lm2.compile(sampler="greedy")
    after = lm2.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(before["token_ids"], after["token_ids"])


@pytest.mark.parametrize("kind", ["mistral", "qwen"])
def test_other_llama_family_backbones(kind):
    import keras_hub

    common = dict(vocabulary_size=50, num_layers=1, num_query_heads=4, num_key_value_heads=2,
                  hidden_dim=16, intermediate_dim=32)
    if kind == "mistral":
        backbone = keras_hub.models.MistralBackbone(sliding_window=6, **common)
    else:
        backbone = keras_hub.models.QwenBackbone(use_sliding_window_attention=True, sliding_window_size=6,
                                                 **common)
    ids = tf.constant(np.random.default_rng(1).integers(0, 50, size=(2, 21)), tf.int32)
    padding = np.ones((2, 21), np.int32)
    padding[0, 15:] = 0
    padding = tf.constant(padding)
    before = _logits_and_grads(backbone, ids, padding)
    assert attention.use_memory_efficient_attention(backbone, block_size=8) == 1
    _compare(before, _logits_and_grads(backbone, ids, padding))


def test_a_decoder_run_uses_the_memory_efficient_kernel_by_default_and_trains_as_standard_attention(
        llama_folder, tmp_path):
    """--attention=auto switches the tiny llama's blocks (metrics.json says so) and ends where
    --attention=standard ends; the export path gets keras-hub's attention back."""
    import decoder_fixtures as fx
    from kft.config import Config
    from kft.training import trainer

    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(16, 0))
    dev = fx.write_jsonl(tmp_path / "dev.jsonl", fx.chats(4, 1))

    def run(mode: str):
        config = Config(task="causal_lm", backbone=llama_folder, train_file=train, eval_file=dev, method="lora",
                        attention=mode, epochs=1, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0,
                        max_new_tokens=0, drift=False, export=False, checkpoint_every_steps=0, seed=3,
                        deterministic=True)
        return trainer.fit_model(config, str(tmp_path / mode))

    standard, efficient = run("standard"), run("auto")
    assert standard.metrics["method"]["attention"] == "standard"
    assert efficient.metrics["method"]["attention"] == "memory_efficient (2 blocks)"
    for a, b in zip(standard.model.trainable_weights, efficient.model.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)
    assert efficient.metrics["eval"]["loss"] == pytest.approx(standard.metrics["eval"]["loss"], rel=1e-5)
