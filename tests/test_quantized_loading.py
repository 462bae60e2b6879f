"""--base_quantization while loading: block projections created int8 / int4 and filled tensor by
tensor, equal to loading in float and quantizing afterwards, with no float32 copy of them held."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kft.models import backbones, quantized_loading

IDS = np.array([[1, 40, 70, 9, 120, 5, 33, 8], [1, 300, 5, 120, 9, 70, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
MASK[:, 0] = 1


def _float_then_quantized(folder: str, mode: str):
    from kft.methods import quantized_base

    loaded = backbones.load_decoder(folder)
    quantized_base.apply(loaded.backbone, mode)
    return loaded


def _hidden(backbone) -> np.ndarray:
    return np.asarray(backbone({"token_ids": IDS, "padding_mask": MASK}))


def _bf16_folder(tmp_path, llama_folder: str) -> str:
    """The tiny llama written in bfloat16 as two shards with an index, as large checkpoints ship."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "bf16"
    folder.mkdir()
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(f"{llama_folder}/model.safetensors").items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}, f)
    for name in os.listdir(llama_folder):
        if not name.endswith(".safetensors"):
            with open(os.path.join(llama_folder, name), "rb") as src, open(folder / name, "wb") as dst:
                dst.write(src.read())
    return str(folder)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_loading_quantized_equals_loading_in_float_then_quantizing(request, architecture, mode):
    from kft.methods import quantized_base

    folder = request.getfixturevalue(f"{architecture}_folder")
    expected = _float_then_quantized(folder, mode).backbone
    loaded = backbones.load_decoder(folder, base_quantization=mode)
    assert any("quantized while loading" in note for note in loaded.notes)
    got = {w.path: w for w in loaded.backbone.weights}
    assert sorted(got) == sorted(w.path for w in expected.weights)
    for w in expected.weights:
        assert got[w.path].dtype == w.dtype, w.path
        np.testing.assert_array_equal(got[w.path].numpy(), w.numpy(), err_msg=w.path)
    # int kernels, scales and zero points are all compared above; and they are what computes
    layers = quantized_base.projections(loaded.backbone)
    assert {layer.quantization_mode for layer in layers} == {mode}
    assert all(str(layer._kernel.dtype).endswith("int8") for layer in layers)
    assert [layer.dtype_policy.name for layer in layers] == \
        [layer.dtype_policy.name for layer in quantized_base.projections(expected)]
    assert loaded.backbone.get_config()["dtype"] == expected.get_config()["dtype"]
    np.testing.assert_array_equal(_hidden(loaded.backbone), _hidden(expected))


# several int4 groups of 128 inputs (the last one partial), and the attention's einsum layouts
INPUTS = {"dense": (None, 300), "query": (None, None, 300), "output": (None, None, 5, 60)}


def _layer(kind: str, dtype):
    import keras

    if kind == "dense":
        return keras.layers.Dense(24, use_bias=False, dtype=dtype)
    if kind == "query":
        return keras.layers.EinsumDense("bqm,muh->bquh", (None, 3, 8), dtype=dtype)
    return keras.layers.EinsumDense("bquh,uhm->bqm", (None, 40), dtype=dtype)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_quantized_values_are_what_layer_quantize_stores(kind, mode):
    import keras

    from kft.methods import quantized_base
    reference = _layer(kind, "float32")
    reference.build(INPUTS[kind])
    kernel = np.random.default_rng(0).standard_normal(reference.kernel.shape).astype(np.float32) * 0.1
    reference.kernel.assign(kernel)
    reference.quantize(mode, config=quantized_base.weight_only_config(mode))
    created = _layer(kind, quantized_loading.policy_map(mode)["transformer_layer_0/self_attention/query"])
    created.build(INPUTS[kind])
    assert created.quantization_mode == mode and quantized_loading.kernel_shape(created) == kernel.shape
    values = quantized_loading.quantized_values(created, kernel, mode)
    expected = {v.name: v.numpy() for v in reference.weights}
    assert sorted(values) == sorted(n for n in expected if n != "g_idx")
    for name, value in values.items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(value), expected[name], err_msg=name)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_bfloat16_sharded_checkpoint_loads_quantized_like_its_float_load(llama_folder, tmp_path, mode):
    folder = _bf16_folder(tmp_path, llama_folder)
    expected = _float_then_quantized(folder, mode).backbone
    loaded = backbones.load_decoder(folder, base_quantization=mode)
    got = {w.path: w.numpy() for w in loaded.backbone.weights}
    for w in expected.weights:
        np.testing.assert_array_equal(got[w.path], w.numpy(), err_msg=w.path)
    # every checkpoint tensor is matched by a weight, a quantized kernel by the float kernel it holds
    report = backbones.check_weights(loaded, folder)
    assert report == {"unused_tensors": [], "unmatched_weights": []}


def test_the_file_reader_returns_what_safetensors_returns(llama_folder, tmp_path):
    import safetensors

    folder = _bf16_folder(tmp_path, llama_folder)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    with quantized_loading._file_reader(folder) as reader:
        for name, shard in weight_map.items():
            with safetensors.safe_open(os.path.join(folder, shard), framework="np") as f:
                expected = f.get_tensor(name)
            got = reader.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16), err_msg=name)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_no_float_projection_kernel_is_ever_created(llama_folder, monkeypatch, mode):
    """Every float variable created while loading is recorded: none has a projection's kernel shape
    (the tiny llama's embeddings and norms have other shapes)."""
    import keras

    from kft.methods import quantized_base
    created = []
    original = keras.Variable.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.append((self.path, tuple(self.shape), str(self.dtype)))

    monkeypatch.setattr(keras.Variable, "__init__", recording)
    loaded = backbones.load_decoder(llama_folder, base_quantization=mode)
    monkeypatch.setattr(keras.Variable, "__init__", original)
    layers = quantized_base.projections(loaded.backbone)
    shapes = {quantized_loading.kernel_shape(layer) for layer in layers}
    float_kernels = [c for c in created if c[2].startswith("float") and c[1] in shapes]
    assert created and not float_kernels, float_kernels
    int_kernels = [c for c in created if c[2] == "int8" and c[0].endswith("/kernel")]
    assert len(int_kernels) == len(layers)


def test_a_kernel_of_the_wrong_shape_or_not_finite_is_refused(llama_folder):
    from kft.methods import quantized_base
    loaded = backbones.load_decoder(llama_folder, base_quantization="int8")
    layer = quantized_base.projections(loaded.backbone)[0]
    with quantized_loading.quantize_on_assign([layer], "int8") as pending:
        stand_in = layer.kernel
        assert stand_in is pending[id(layer)] and stand_in.shape == quantized_loading.kernel_shape(layer)
        with pytest.raises(ValueError, match="shape"):
            stand_in.assign(np.zeros((3, 3), np.float32))
        bad = np.zeros(stand_in.shape, np.float32)
        bad.flat[0] = np.nan
        with pytest.raises(ValueError, match="NaN or Inf"):
            stand_in.assign(bad)
    assert layer.kernel is not stand_in  # the class property is restored


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_over_a_base_loaded_quantized_trains_only_the_adapter(llama_folder, mode):
    import keras
    import tensorflow as tf

    from kft import methods
    from kft.config import Config
    from kft.methods import lora, quantized_base
    from kft.tasks.causal_lm import model as lm_model

    keras.utils.set_random_seed(0)
    loaded = backbones.load_decoder(llama_folder, base_quantization=mode)
    config = Config(task="causal_lm", method="lora", lora_rank=4, base_quantization=mode)
    backbone, info = methods.apply(loaded.backbone, config)
    described = info["base_quantization"]
    assert described["layers"] == len(quantized_base.projections(backbone))
    assert described["kernel_bytes"] < described["kernel_bytes_float32"] / (3 if mode == "int8" else 5)
    wrappers = [layer for layer in backbone._flatten_layers() if isinstance(layer, lora.LoRAProjection)]
    assert wrappers and all(w.in_shape + w.out_shape == quantized_loading.kernel_shape(w.base) for w in wrappers)
    model = lm_model.build_model(backbone)
    assert model.trainable_weights and all("lora" in v.path for v in model.trainable_weights)
    frozen = {v.path: np.array(v.numpy()) for v in model.weights if "lora" not in v.path}
    before = np.asarray(model({"token_ids": IDS, "padding_mask": MASK}))
    optimizer = keras.optimizers.Adam(1e-2)
    target = tf.random.stateless_normal(before.shape, seed=(1, 2))
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model({"token_ids": IDS, "padding_mask": MASK}, training=True) - target) ** 2)
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
    for v in model.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(v.numpy(), frozen[v.path], err_msg=v.path)
    assert np.abs(np.asarray(model({"token_ids": IDS, "padding_mask": MASK})) - before).max() > 1e-3


def test_prompt_tuning_over_a_base_loaded_quantized_trains_only_the_prompt(llama_folder):
    import tensorflow as tf

    from kft import methods
    from kft.config import Config
    from kft.tasks.causal_lm import model as lm_model

    loaded = backbones.load_decoder(llama_folder, base_quantization="int8")
    config = Config(task="causal_lm", method="prompt", num_prompt_tokens=3, base_quantization="int8")
    backbone, info = methods.apply(loaded.backbone, config)
    assert info["base_quantization"]["mode"] == "int8"
    model = lm_model.build_model(backbone)
    assert model.trainable_weights and all("prompt" in v.path for v in model.trainable_weights)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model({"token_ids": IDS, "padding_mask": MASK}, training=True) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None and np.abs(np.asarray(g)).max() > 0 for g in grads)


def test_a_checkpoint_whose_other_layers_match_the_projection_names_loads_in_float(llama_folder, monkeypatch):
    """Where the map would quantize more than the block projections, loading falls back to float
    (the method quantizes afterwards) rather than quantizing a layer the method leaves float."""
    monkeypatch.setattr(quantized_loading, "_PATH", r".*")
    loaded = backbones.load_decoder(llama_folder, base_quantization="int8")
    assert not any("quantized while loading" in note for note in loaded.notes)
    assert all(layer.quantization_mode is None for layer in loaded.backbone._flatten_layers())
    expected = backbones.load_decoder(llama_folder)
    np.testing.assert_array_equal(_hidden(loaded.backbone), _hidden(expected.backbone))
