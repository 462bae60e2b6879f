"""Tuning methods on a tiny random backbone: exactly the intended variables train."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from kft import backbones, export, methods, optim, trainer
from kft.methods import lora
from kft.config import FlagError
from kft.tasks import classification

HIDDEN, LAYERS, HEAD = 16, 2, 16 * 2 + 2  # the tiny backbone; Dense(16 -> 2 classes)


def _build(tiny_preset, **overrides):
    config = tiny_config(**overrides)
    loaded = backbones.load(tiny_preset)
    info = methods.apply(loaded.backbone, config)
    model = classification.build_model(loaded.backbone, 2, 0.0, seed=1)
    return model, info, config


def _one_step(model, config):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, (8, 10)).astype(np.int32)
    features = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    labels = rng.integers(0, 2, 8)
    opt = optim.build_optimizer(config, total_steps=10)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(classification.per_example_loss(labels, model(features, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))


def _changed_after_one_step(model, config):
    before = {v.path: v.numpy().copy() for v in model.weights}
    _one_step(model, config)
    return {v.path for v in model.weights if not np.array_equal(before[v.path], v.numpy())}


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def test_bitfit_trains_only_biases_and_the_head(tiny_preset):
    model, info, config = _build(tiny_preset, method="bitfit", learning_rate=1e-2)
    biases = [v for v in model.weights if v.path.endswith(("/bias", "/beta")) and "classifier" not in v.path]
    assert _count(model.trainable_variables) == _count(biases) + HEAD
    changed = _changed_after_one_step(model, config)
    trainable = {v.path for v in model.trainable_variables}
    assert changed <= trainable and changed  # every other variable is bit-identical
    assert any(p.endswith("/bias") and "classifier" not in p for p in changed)
    assert not any(p.endswith("/kernel") and "classifier" not in p for p in changed)


@pytest.mark.parametrize("rank,targets", [(4, ["query", "value"]), (2, ["key", "attention_output", "ffn_in",
                                                                        "ffn_out"])])
def test_lora_trains_only_the_low_rank_factors_and_the_head(tiny_preset, rank, targets):
    model, info, config = _build(tiny_preset, method="lora", lora_rank=rank, lora_targets=targets,
                                 learning_rate=1e-2)
    fan = {"query": (16, 16), "key": (16, 16), "value": (16, 16), "attention_output": (16, 16),
           "ffn_in": (16, 32), "ffn_out": (32, 16)}
    expected = LAYERS * sum(rank * (fan[t][0] + fan[t][1]) for t in targets) + HEAD
    assert _count(model.trainable_variables) == expected
    assert info["adapted_layers"] == LAYERS * len(targets)
    changed = _changed_after_one_step(model, config)
    assert changed <= {v.path for v in model.trainable_variables}
    assert any(p.endswith("lora_b") for p in changed)
    assert not any(p.endswith("/kernel") and "classifier" not in p for p in changed)


def test_lora_starts_from_the_pretrained_function(tiny_preset):
    plain, _, _ = _build(tiny_preset)
    lora, _, _ = _build(tiny_preset, method="lora")
    lora.get_layer("classifier").set_weights(plain.get_layer("classifier").get_weights())
    ids = np.array([[2, 7, 9, 11, 3]], np.int32)
    features = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(lora(features).numpy(), plain(features).numpy(), atol=1e-6)


def test_merging_lora_keeps_the_function_and_leaves_only_base_weights(tiny_preset):
    model, _, config = _build(tiny_preset, method="lora", lora_targets=["query", "value", "ffn_out"],
                              learning_rate=1e-2)
    for _ in range(3):
        _one_step(model, config)
    ids = np.array([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]], np.int32)
    features = {"token_ids": ids, "padding_mask": (ids > 0).astype(np.int32)}
    adapted = model(features).numpy()
    assert lora.merge(_backbone(model)) == LAYERS * 3
    assert not any("lora" in v.path for v in model.weights)
    np.testing.assert_allclose(model(features).numpy(), adapted, atol=1e-5)


def _backbone(model):
    import keras_hub

    return next(layer for layer in model.layers if isinstance(layer, keras_hub.models.Backbone))


@pytest.mark.parametrize("overrides,message", [
    ({"method": "lora", "lora_targets": ["query", "gate"]}, r"unknown \['gate'\]"),
    ({"method": "lora", "lora_rank": 0}, "at least 1"),
    ({"method": "bitfit", "freeze_layers": 1}, "--freeze_layers=1 applies to --method=freeze"),
])
def test_bad_method_flags_are_refused(tiny_preset, overrides, message):
    with pytest.raises(FlagError, match=message):
        _build(tiny_preset, **overrides)


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_a_method_trains_reports_its_parameters_and_exports_the_same_function(tiny_preset, tmp_path, method):
    config = tiny_config(backbone=tiny_preset, method=method, export=True, export_dir=str(tmp_path / "x"))
    trained = trainer.fit_model(config, str(tmp_path / "m"))
    parameters = trained.metrics["parameters"]
    # (LoRA: the default rank 8 on query and value; its factors are merged away before export)
    expected = (LAYERS * 2 * 8 * (16 + 16) + HEAD if method == "lora"
                else _count(trained.model.trainable_variables))
    assert parameters["trainable"] == expected < parameters["total"]
    assert trained.metrics["method"]["method"] == method
    served = export.load(trained.metrics["export"]).signatures["serve_token_ids"]
    ids = np.array([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    expected = trained.model({"token_ids": ids, "padding_mask": mask}).numpy()
    got = served(token_ids=tf.constant(ids), padding_mask=tf.constant(mask))["probabilities"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    if method == "lora":  # merged at export: the served graph has only the base weights
        assert not any("lora" in v.name for v in export.load(trained.metrics["export"]).variables)
