"""Tuning methods on a tiny random backbone: exactly the intended variables train."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_python, tiny_config
from kft import methods
from kft.models import adapters
from kft.models import backbones
from kft.training import optim
from kft.training import trainer
from kft.methods import lora, prefix
from kft.config import FlagError
from kft.tasks import classification

HIDDEN, LAYERS, HEAD = 16, 2, 16 * 2 + 2  # the tiny backbone; Dense(16 -> 2 classes)


def _build(tiny_preset, **overrides):
    config = tiny_config(**overrides)
    loaded = backbones.load(tiny_preset)
    backbone, info = methods.apply(loaded.backbone, config, loaded.tokenizer.get_vocabulary())
    model = classification.build_model(backbone, 2, 0.0, seed=1)
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
    """Paths of the variables that one step changed, checking every variable by position."""
    before = [v.numpy().copy() for v in model.weights]
    _one_step(model, config)
    changed = [v for v, b in zip(model.weights, before) if not np.array_equal(b, v.numpy())]
    trainable = {id(v) for v in model.trainable_variables}
    assert all(id(v) in trainable for v in changed), "a frozen variable changed"  # others bit-identical
    return {v.path for v in changed}


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def test_bitfit_trains_only_biases_and_the_head(tiny_preset):
    model, info, config = _build(tiny_preset, method="bitfit", learning_rate=1e-2)
    biases = [v for v in model.weights if v.path.endswith(("/bias", "/beta")) and "classifier" not in v.path]
    assert _count(model.trainable_variables) == _count(biases) + HEAD
    changed = _changed_after_one_step(model, config)
    assert changed
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
    assert any(p.endswith("lora_b") for p in changed)
    assert not any(p.endswith("/kernel") and "classifier" not in p for p in changed)


def test_lora_on_an_encoder_adapts_query_and_value_by_default(tiny_preset):
    model, info, _ = _build(tiny_preset, method="lora")
    assert info["targets"] == ["query", "value"]
    assert info["targets_source"] == "default for --task=classification (encoder: query,value)"
    assert info["adapted_layers"] == LAYERS * 2


def test_lora_starts_from_the_pretrained_function(tiny_preset):
    plain, _, _ = _build(tiny_preset)
    lora, _, _ = _build(tiny_preset, method="lora")
    lora.get_layer("classifier").set_weights(plain.get_layer("classifier").get_weights())
    ids = np.array([[2, 7, 9, 11, 3]], np.int32)
    features = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(lora(features).numpy(), plain(features).numpy(), atol=1e-6)


def _after_three_steps(tiny_preset, **overrides):
    """A model trained three steps (so the method's weights are no longer at their start), and a
    padded two-text batch to compare outputs on."""
    model, _, config = _build(tiny_preset, learning_rate=1e-2, **overrides)
    for _ in range(3):
        _one_step(model, config)
    ids = np.array([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]], np.int32)
    return model, {"token_ids": ids, "padding_mask": (ids > 0).astype(np.int32)}


def test_merging_lora_keeps_the_function_and_leaves_only_base_weights(tiny_preset):
    model, features = _after_three_steps(tiny_preset, method="lora",
                                         lora_targets=["query", "value", "ffn_out"])
    adapted = model(features).numpy()
    base_kernels = {id(layer.base.kernel) for layer in _backbone(model)._flatten_layers()
                    if isinstance(layer, lora.LoRAProjection)}
    assert lora.merge(_backbone(model)) == LAYERS * 3
    assert not any("lora" in v.path for v in model.weights)
    # the base projections are back among the model's weights (and layers, for Model.quantize)
    assert base_kernels <= {id(v) for v in model.weights}
    np.testing.assert_allclose(model(features).numpy(), adapted, atol=1e-5)


def _backbone(model):
    import keras

    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


@pytest.mark.parametrize("overrides,message", [
    ({"method": "lora", "lora_targets": ["query", "mlp"]}, r"unknown \['mlp'\]"),
    ({"method": "lora", "lora_targets": ["gate"]}, r"has no _feedforward_gate_dense projection"),
    ({"method": "lora", "lora_rank": 0}, "at least 1"),
    ({"method": "bitfit", "freeze_layers": 1}, "--freeze_layers=1 applies to --method=freeze"),
    ({"method": "prompt", "num_prompt_tokens": 0}, "--num_prompt_tokens=0: must be at least 1"),
    ({"method": "prefix", "prefix_length": 0}, "--prefix_length=0: must be at least 1"),
    ({"method": "prefix", "prefix_projection": -1}, "--prefix_projection=-1"),
])
def test_bad_method_flags_are_refused(tiny_preset, overrides, message):
    with pytest.raises(FlagError, match=message):
        _build(tiny_preset, **overrides)


def test_prompt_tuning_trains_only_the_prompt_and_the_head(tiny_preset):
    model, info, config = _build(tiny_preset, method="prompt", num_prompt_tokens=3, learning_rate=1e-2)
    assert _count(model.trainable_variables) == 3 * HIDDEN + HEAD
    changed = _changed_after_one_step(model, config)
    assert "prompt_tokens/prompts" in changed and "classifier/kernel" in changed


def test_prompts_start_as_embedded_vocabulary_words(tiny_preset):
    model, _, _ = _build(tiny_preset, method="prompt", num_prompt_tokens=4)
    prompts = _backbone(model).get_layer("prompt_tokens").prompts.numpy()
    # block inputs are layer-normed embeddings: unit-scale rows, all different
    assert np.all(np.abs(prompts.std(-1) - 1.0) < 0.5) and len({r.tobytes() for r in prompts}) == 4


@pytest.mark.parametrize("projection", [0, 8])
def test_prefix_tuning_trains_only_the_prefix_and_the_head(tiny_preset, projection):
    length = 4
    model, info, config = _build(tiny_preset, method="prefix", prefix_length=length,
                                 prefix_projection=projection, learning_rate=1e-2)
    if projection:  # embedding [length, hidden] -> Dense(projection, tanh) -> Dense(keys+values, all layers)
        out = LAYERS * 2 * HIDDEN
        expected = length * HIDDEN + (HIDDEN + 1) * projection + (projection + 1) * out + HEAD
    else:  # a key and a value vector per prefix position, per layer
        expected = LAYERS * 2 * length * HIDDEN + HEAD
    assert _count(model.trainable_variables) == expected
    changed = _changed_after_one_step(model, config)
    assert any(("prefix" in p or "out/" in p) for p in changed) and "classifier/kernel" in changed


@pytest.mark.parametrize("overrides", [{"method": "prompt", "num_prompt_tokens": 3},
                                       {"method": "prefix", "prefix_length": 3}])
def test_added_positions_respect_padding(tiny_preset, overrides):
    """A text's prediction does not depend on how much padding its batch adds."""
    model, _, _ = _build(tiny_preset, **overrides)
    ids = np.array([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]], np.int32)
    both = model({"token_ids": ids, "padding_mask": (ids > 0).astype(np.int32)}).numpy()
    alone = model({"token_ids": ids[1:, :3], "padding_mask": np.ones((1, 3), np.int32)}).numpy()
    np.testing.assert_allclose(alone, both[1:], atol=1e-6)


def test_the_prefix_mlp_starts_from_the_initial_vectors(tiny_preset):
    direct, _, _ = _build(tiny_preset, method="prefix", prefix_length=4)
    with_mlp, _, _ = _build(tiny_preset, method="prefix", prefix_length=4, prefix_projection=8)
    with_mlp.get_layer("classifier").set_weights(direct.get_layer("classifier").get_weights())
    ids = np.array([[2, 7, 9, 11, 3]], np.int32)
    features = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(with_mlp(features).numpy(), direct(features).numpy(), atol=1e-6)


def test_folding_the_prefix_mlp_keeps_the_function_and_drops_its_weights(tiny_preset):
    model, features = _after_three_steps(tiny_preset, method="prefix", prefix_length=4, prefix_projection=8)
    before = model(features).numpy()
    assert prefix.fold(_backbone(model))
    assert not any("prefix_encoder" in v.path or v.path.startswith(("hidden/", "out/"))
                   for v in model.weights)
    np.testing.assert_allclose(model(features).numpy(), before, atol=1e-5)
    assert not prefix.fold(_backbone(model))  # nothing left to fold


CHECK = r"""
import sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401
path, ids_npz, out = sys.argv[1:]
z = np.load(ids_npz)
served = tf.saved_model.load(path).signatures["serve_token_ids"]
probabilities = served(token_ids=tf.constant(z["ids"]), padding_mask=tf.constant(z["mask"]))["probabilities"]
names = [v.name for v in tf.saved_model.load(path).variables]
np.savez(out, probabilities=probabilities.numpy(), names=np.array(names))
"""

METHOD_RUNS = {
    "lora": dict(method="lora"),
    "prompt": dict(method="prompt", num_prompt_tokens=4),
    "prefix": dict(method="prefix", prefix_length=4, prefix_projection=8),
    "bitfit": dict(method="bitfit"),
    "freeze": dict(method="freeze", freeze_layers=1),
}


@pytest.fixture(scope="module", params=sorted(METHOD_RUNS))
def method_run(request, tiny_preset, tmp_path_factory):
    """One exported run per method, shared by the in-process and the fresh-process checks:
    (method, fitted run, ids, mask, the in-memory model's probabilities)."""
    method = request.param
    tmp = tmp_path_factory.mktemp(f"method_{method}")
    config = tiny_config(backbone=tiny_preset, export=True, export_dir=str(tmp / "x"), **METHOD_RUNS[method])
    trained = trainer.fit_model(config, str(tmp / "m"))
    ids = np.array([[2, 7, 9, 11, 3], [2, 5, 3, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    return method, trained, ids, mask, trained.model({"token_ids": ids, "padding_mask": mask}).numpy()


def test_a_methods_export_computes_the_trained_function_and_its_adapter_reloads_it(
        method_run, tiny_preset, tmp_path):
    method, trained, ids, mask, expected = method_run
    metrics = trained.metrics
    assert metrics["method"]["method"] == method
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    assert metrics["adapter"]["parameters"] == metrics["parameters"]["trainable"]

    # The export (loaded here; tests below load it in a fresh process) computes the same function.
    served = tf.saved_model.load(metrics["export"])
    got = served.signatures["serve_token_ids"](token_ids=tf.constant(ids), padding_mask=tf.constant(mask))
    np.testing.assert_allclose(got["probabilities"].numpy(), expected, atol=1e-5)
    # training-time structure is gone: LoRA merged, the prefix MLP folded
    assert not any(("lora" in v.name or "prefix_encoder" in v.name) for v in served.variables)

    # The adapter alone, on a freshly loaded backbone, reproduces the predictions (no training).
    again = trainer.fit_model(tiny_config(backbone=tiny_preset, adapter=metrics["adapter"]["path"], epochs=0,
                                          **METHOD_RUNS[method]), str(tmp_path / "m2"))
    assert again.metrics["adapter_loaded"]["parameters"] == metrics["adapter"]["parameters"]
    np.testing.assert_allclose(again.model({"token_ids": ids, "padding_mask": mask}).numpy(), expected,
                               atol=1e-5)
    assert again.metrics["eval"]["accuracy"] == pytest.approx(metrics["eval"]["accuracy"])


@pytest.mark.slow
def test_a_methods_export_serves_the_trained_function_in_a_fresh_process(method_run, tmp_path):
    _, trained, ids, mask, expected = method_run
    np.savez(tmp_path / "ids.npz", ids=ids, mask=mask)
    proc = run_python(["-c", CHECK, trained.metrics["export"], str(tmp_path / "ids.npz"), str(tmp_path / "out.npz")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-5)
    assert not any(("lora" in n or "prefix_encoder" in n) for n in got["names"].astype(str))


def test_an_adapter_is_refused_for_other_flags_or_labels(tiny_preset, tmp_path):
    config = tiny_config(backbone=tiny_preset, method="lora", lora_rank=2)
    path = trainer.fit_model(config, str(tmp_path / "m")).metrics["adapter"]["path"]
    with pytest.raises(FlagError, match=r"trained with --lora_rank=2, this run has --lora_rank=4"):
        trainer.fit_model(tiny_config(backbone=tiny_preset, method="lora", lora_rank=4, adapter=path,
                                      epochs=0), str(tmp_path / "a"))
    with pytest.raises(FlagError, match=r"trained with --method=lora, this run has --method=bitfit"):
        trainer.fit_model(tiny_config(backbone=tiny_preset, method="bitfit", adapter=path, epochs=0),
                          str(tmp_path / "b"))
    with pytest.raises(FlagError, match=r"its labels are \['negative', 'positive'\], this run's data has"):
        adapters.load(None, config, path, ["bad", "good"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FlagError, match=r"junk.safetensors: not a readable safetensors file"):
        adapters.load(None, config, str(tmp_path / "junk.safetensors"), ["negative", "positive"])
