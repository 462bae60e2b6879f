"""Drift: how far fine-tuning moved the backbone's weights and representations from the start."""

import numpy as np
import pytest

from conftest import tiny_config
from kft.training import drift
from kft.training import trainer


def test_linear_cka_is_one_for_the_same_representation_up_to_rotation_and_scale_and_low_for_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert drift.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert drift.linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-9)
    assert drift.linear_cka(x, rng.normal(size=(200, 16))) < 0.2


def test_an_untrained_run_has_no_drift_and_a_trained_one_has_some(tiny_preset, tmp_path):
    still = trainer.fit_model(tiny_config(backbone=tiny_preset, epochs=0, drift=True), str(tmp_path / "a")).metrics["drift"]
    assert still["weights"]["overall"] == 0.0 and set(still["weights"]["per_layer"]) == {0.0}
    assert still["representations"]["per_layer"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert still["representations"]["texts"] == len(drift.general_text()) >= 200
    assert "perplexity" not in still  # decoders only
    moved = trainer.fit_model(tiny_config(backbone=tiny_preset, epochs=2, drift=True), str(tmp_path / "b")).metrics["drift"]
    assert moved["weights"]["overall"] > 0 and all(d > 0 for d in moved["weights"]["per_layer"])
    assert all(c < 1.0 for c in moved["representations"]["per_layer"])
    assert (tmp_path / "b" / "drift.png").exists()


def test_lora_drift_counts_the_merged_update_and_frozen_prompts_leave_the_weights_where_they_were(
        tiny_preset, tmp_path):
    lora = trainer.fit_model(tiny_config(backbone=tiny_preset, method="lora", lora_rank=4, epochs=2, drift=True),
                             str(tmp_path / "lora")).metrics["drift"]
    assert lora["weights"]["overall"] > 0  # the base kernels are frozen; W + BA moved
    prompt = trainer.fit_model(tiny_config(backbone=tiny_preset, method="prompt", epochs=1, drift=True),
                               str(tmp_path / "prompt")).metrics["drift"]
    assert prompt["weights"]["overall"] == 0.0


def test_l2sp_pulls_the_backbone_toward_its_start_and_decays_only_the_head_toward_zero(tiny_preset):
    import keras

    from kft.models import backbones
    from kft.training import optim
    from kft.tasks import classification

    loaded = backbones.load(tiny_preset)
    start = drift.snapshot(loaded, representations=False)
    model = classification.build_model(loaded.backbone, 2, 0.0)
    config = tiny_config(learning_rate=1e-2, warmup_ratio=0.0, regularize_to_pretrained="l2sp", l2sp_weight=5.0)
    optimizer = optim.build_optimizer(config, total_steps=10)
    assert optimizer.anchor(drift.anchors(start, loaded.backbone), config.l2sp_weight) == len(
        loaded.backbone.trainable_weights)
    kernel = loaded.backbone.trainable_weights[3]
    theta0 = np.array(kernel.numpy())
    kernel.assign(theta0 + 0.5)  # moved away from the start
    head = model.get_layer("classifier").kernel
    head_before = np.array(head.numpy())
    # zero gradients: Adam's step is 0, only the decay acts
    optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in model.trainable_variables])
    lr = 1e-2
    np.testing.assert_allclose(kernel.numpy() - theta0, 0.5 * (1 - lr * 5.0), rtol=1e-5)
    np.testing.assert_allclose(head.numpy(), head_before * (1 - lr * config.weight_decay), rtol=1e-5)


def test_l2sp_ends_a_run_closer_to_the_start_than_plain_weight_decay(tiny_preset, tmp_path):
    common = dict(backbone=tiny_preset, epochs=2, learning_rate=3e-3, drift=True)
    plain = trainer.fit_model(tiny_config(**common), str(tmp_path / "plain")).metrics["drift"]
    pulled = trainer.fit_model(tiny_config(**common, regularize_to_pretrained="l2sp", l2sp_weight=50.0),
                               str(tmp_path / "l2sp")).metrics["drift"]
    assert pulled["weights"]["overall"] < 0.8 * plain["weights"]["overall"]
    from kft.config import FlagError

    with pytest.raises(FlagError, match="--l2sp_weight applies with --regularize_to_pretrained=l2sp only"):
        trainer.fit_model(tiny_config(**{**common, "drift": False, "epochs": 0}, l2sp_weight=3.0), str(tmp_path / "x"))
