"""Gradient checkpointing (--gradient_checkpointing): the same gradients, the blocks run twice."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kft.models import backbones
from kft.training import recompute
from kft.training import trainer
from kft.config import FlagError
# llama_folder: the tiny llama of tests/conftest.py (session-scoped, shared)


def _decoder_gradients(folder: str, checkpointed: bool, calls: list, method: str = "full") -> list[np.ndarray]:
    """Gradients of a next-token loss over every trainable weight, in a tf.function (as the loop)."""
    import keras

    from kft import methods
    from kft.config import Config
    from kft.tasks.causal_lm import model as lm_model

    keras.utils.set_random_seed(0)  # the same LoRA initialisation both times
    loaded = backbones.load_decoder(folder)
    if method != "full":
        methods.apply(loaded.backbone, Config(task="causal_lm", method=method, lora_rank=2))
    for block in backbones.transformer_layers(loaded.backbone):
        original = block.call

        def counted(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        block.call = counted
    if checkpointed:
        assert recompute.enable(loaded.backbone) == len(backbones.transformer_layers(loaded.backbone))
    model = lm_model.build_model(loaded.backbone)
    loss_fn = lm_model.loss_function(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 50, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    labels = np.where(mask == 1, np.roll(ids, -1, axis=1), -1).astype(np.int32)
    labels[:, -1] = -1

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            hidden = model({"token_ids": ids, "padding_mask": mask}, training=True)
            loss = tf.reduce_sum(loss_fn(labels, hidden))
        return tape.gradient(loss, model.trainable_weights)

    grads = step()
    assert all(g is not None for g in grads)
    return [np.asarray(g) for g in grads]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_checkpointed_decoder_has_the_plain_gradients_and_runs_each_block_again(llama_folder, method):
    plain_calls, checkpointed_calls = [], []
    plain = _decoder_gradients(llama_folder, False, plain_calls, method)
    checkpointed = _decoder_gradients(llama_folder, True, checkpointed_calls, method)
    assert len(plain) == len(checkpointed)
    assert any(np.abs(g).max() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # traced once for the forward pass and once more for the recomputation in the backward pass
    assert len(checkpointed_calls) == 2 * len(plain_calls) > 0


def test_generation_and_inference_calls_are_not_recomputed(llama_folder, monkeypatch):
    from kft.tasks.causal_lm.model import Generator

    wrapped = []
    original_recompute_grad = tf.recompute_grad
    monkeypatch.setattr(recompute.tf, "recompute_grad", lambda f: wrapped.append(f) or original_recompute_grad(f))
    loaded = backbones.load_decoder(llama_folder)
    ids = np.arange(3, 11, dtype=np.int32)[None]
    features = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    before = loaded.backbone(features).numpy()
    generate = Generator(loaded.backbone, loaded.causal_lm_class, loaded.stop_ids, loaded.pad_id, 1)
    tokens_before, _ = generate([ids[0]], 4)
    recompute.enable(loaded.backbone)
    block = backbones.transformer_layers(loaded.backbone)[0]
    wrapped_call = block.call
    recompute.enable(loaded.backbone)  # enabling twice wraps once
    assert block.call is wrapped_call
    after = loaded.backbone(features).numpy()
    tokens_after, _ = generate([ids[0]], 4)
    np.testing.assert_array_equal(before, after)
    assert [list(t) for t in tokens_after] == [list(t) for t in tokens_before]
    assert not wrapped  # neither the inference call nor the cached generation went through it
    loaded.backbone(features, training=True)
    assert len(wrapped) == len(backbones.transformer_layers(loaded.backbone))  # a training call does


def _encoder_gradients(preset: str, checkpointed: bool, training: bool = True, steps: int = 1):
    """Loss and gradients of an encoder whose blocks use dropout (0.1), in a tf.function."""
    import keras

    keras.utils.set_random_seed(0)  # the same dropout seed generators both times
    loaded = backbones.load(preset)
    if checkpointed:
        recompute.enable(loaded.backbone)
    backbone = loaded.backbone
    ids = np.random.default_rng(0).integers(5, 40, (3, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    features = {"token_ids": ids, "padding_mask": mask, "segment_ids": np.zeros_like(ids)}
    features = {k: v for k, v in features.items() if k in backbone.input}

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = backbone(features, training=training)
            out = out["sequence_output"] if isinstance(out, dict) else out
            loss = tf.reduce_sum(out * tf.cast(mask[..., None], out.dtype) * tf.sin(tf.range(out.shape[-1], dtype=out.dtype)))
        grads = tape.gradient(loss, backbone.trainable_weights)
        return loss, [tf.convert_to_tensor(g) for g in grads if g is not None]  # the pooler has none

    results = [step() for _ in range(steps)]
    return [(float(loss), [np.asarray(g) for g in grads]) for loss, grads in results]


def test_checkpointing_blocks_with_dropout_keeps_the_plain_masks_loss_and_gradients(tiny_preset):
    """The recomputed pass reuses the forward pass's dropout seeds: two steps with checkpointing give
    the losses and gradients of two plain steps drawn from the same seed generators."""
    plain = _encoder_gradients(tiny_preset, checkpointed=False, steps=2)
    checkpointed = _encoder_gradients(tiny_preset, checkpointed=True, steps=2)
    inference = _encoder_gradients(tiny_preset, checkpointed=False, training=False)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(plain, checkpointed):
        assert loss_a == pytest.approx(loss_b, rel=1e-6)
        for a, b in zip(grads_a, grads_b):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert plain[0][0] != pytest.approx(inference[0][0], rel=1e-4)  # dropout is on in these steps
    assert plain[0][0] != pytest.approx(plain[1][0], rel=1e-6)  # and draws new masks each step


def test_an_encoder_with_dropout_trains_to_the_same_weights_with_checkpointing(tiny_preset, tmp_path, monkeypatch):
    from conftest import tiny_config

    wrapped = []

    def counting_recompute_grad(f):
        wrapped.append(f)
        return original_recompute_grad(f)

    original_recompute_grad = tf.recompute_grad
    monkeypatch.setattr(recompute.tf, "recompute_grad", counting_recompute_grad)

    def final_weights(checkpointing: bool, name: str):
        config = tiny_config(backbone=tiny_preset, deterministic=True, drift=False,
                             gradient_checkpointing=checkpointing, max_train_examples=32)
        fitted = trainer.fit_model(config, str(tmp_path / name))
        return [w.numpy() for w in fitted.model.trainable_weights], fitted

    plain, _ = final_weights(False, "plain")
    assert not wrapped
    checkpointed, fitted = final_weights(True, "checkpointed")
    assert wrapped  # the train step went through the recomputed blocks
    assert fitted.model is not None and len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
