"""--base_quantization=int8|int4: LoRA and prompt tuning over a frozen base held in 8 or 4 bits (the
resume after SIGKILL over a quantized base: tests/test_causal_lm.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kft.config import Config, FlagError
from kft.models import backbones

IDS = np.array([[1, 40, 70, 9, 120, 5, 33, 8], [1, 300, 5, 120, 9, 70, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
MASK[:, 0] = 1


def _config(**overrides) -> Config:
    base = dict(task="causal_lm", method="lora", lora_rank=4)
    base.update(overrides)
    return Config(**base)


def _lora_model(folder: str, mode: str, method: str = "lora"):
    import keras

    from kft import methods
    from kft.tasks.causal_lm import model as lm_model

    keras.utils.set_random_seed(0)
    loaded = backbones.load_decoder(folder)
    config = _config(method=method, num_prompt_tokens=3, base_quantization=mode)
    backbone, info = methods.apply(loaded.backbone, config)
    return lm_model.build_model(backbone), info, loaded


def _hidden(model):
    return np.asarray(model({"token_ids": IDS, "padding_mask": MASK}))


def _train_steps(model, steps: int = 3):
    import keras

    optimizer = keras.optimizers.Adam(1e-2)
    target = tf.random.stateless_normal((2, IDS.shape[1], model.output.shape[-1]), seed=(1, 2))
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model({"token_ids": IDS, "padding_mask": MASK}, training=True) - target) ** 2)
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.02), ("int4", 0.25)])
def test_a_quantized_base_holds_its_kernels_in_few_bits_and_computes_close_to_float(llama_folder, mode,
                                                                                  tolerance):
    from kft.methods import quantized_base

    plain, _, _ = _lora_model(llama_folder, "none")
    quantized, info, loaded = _lora_model(llama_folder, mode)
    described = info["base_quantization"]
    # seven projections in each of the tiny llama's blocks
    assert described["layers"] == 7 * len(backbones.transformer_layers(loaded.backbone))
    assert described["kernel_bytes"] < described["kernel_bytes_float32"] / (3 if mode == "int8" else 5)  # scales included
    layers = quantized_base.projections(loaded.backbone)
    assert {layer.quantization_mode for layer in layers} == {mode}
    assert all(str(layer._kernel.dtype).endswith("int8") for layer in layers)
    a, b = _hidden(plain), _hidden(quantized)
    relative = np.abs(a - b).max() / np.abs(a).max()
    assert 0 < relative < tolerance


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_over_a_quantized_base_trains_only_the_adapter(llama_folder, mode):
    model, info, loaded = _lora_model(llama_folder, mode)
    assert all("lora" in v.path for v in model.trainable_weights)
    frozen = {v.path: np.array(v.numpy()) for v in model.weights if "lora" not in v.path}
    before = _hidden(model)
    _train_steps(model)
    for v in model.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(v.numpy(), frozen[v.path], err_msg=v.path)
    assert np.abs(_hidden(model) - before).max() > 1e-3  # the adapter learned something


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_merging_lora_into_a_quantized_base_gives_a_float_backbone_with_the_same_function(llama_folder, mode):
    from kft.methods import lora, quantized_base

    model, _, loaded = _lora_model(llama_folder, mode)
    _train_steps(model)
    adapted = _hidden(model)
    assert lora.merge(loaded.backbone) == 7 * len(backbones.transformer_layers(loaded.backbone))
    layers = quantized_base.projections(loaded.backbone)
    assert all(layer.quantization_mode is None and layer.kernel.dtype == "float32" for layer in layers)
    assert not any("lora" in v.path for v in model.weights)
    np.testing.assert_allclose(_hidden(model), adapted, atol=2e-5, rtol=1e-4)


def test_prompt_tuning_over_an_int8_base_trains_only_the_prompt(llama_folder):
    model, info, _ = _lora_model(llama_folder, "int8", method="prompt")
    assert info["base_quantization"]["mode"] == "int8"
    assert model.trainable_weights and all("prompt" in v.path for v in model.trainable_weights)
    frozen = {v.path: np.array(v.numpy()) for v in model.weights if v.trainable is False}
    _train_steps(model, steps=1)
    for v in model.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(v.numpy(), frozen[v.path], err_msg=v.path)


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit"])
def test_a_quantized_base_is_refused_where_the_projections_train(llama_folder, method):
    from kft import methods

    loaded = backbones.load_decoder(llama_folder)
    config = _config(method=method, base_quantization="int4")
    with pytest.raises(FlagError, match="--base_quantization=int4.*--method=lora or --method=prompt"):
        methods.apply(loaded.backbone, config)

