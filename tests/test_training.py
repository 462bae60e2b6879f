"""Model, optimizer and strategy behaviour on a tiny random backbone."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from kft.models import backbones
from kft.data import sources as data
from kft.training import distribute
from kft.reporting import metrics
from kft.training import optim
from kft.training import trainer
from kft import config as config_lib
from kft.config import Config, FlagError
from kft.methods import freeze
from kft.tasks import classification


def _batch(n=8, length=10, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[: n // 2, length // 2:] = 0
    ids[mask == 0] = 0
    return {"token_ids": ids, "padding_mask": mask}, rng.integers(0, 2, n).astype(np.int32)


def _model(tiny_preset, **overrides):
    config = tiny_config(**overrides)
    loaded = backbones.load(tiny_preset)
    freeze.apply(loaded.backbone, config)
    model = classification.build_model(loaded.backbone, 2, config.dropout, config.pooling, seed=1)
    model.compile(optimizer=optim.build_optimizer(config, total_steps=10),
                  loss=keras.losses.SparseCategoricalCrossentropy())
    return model, loaded


def _snapshot(layers):
    return [w.numpy().copy() for layer in layers for w in layer.weights]


def test_frozen_layers_do_not_change_after_a_step_while_the_head_does(tiny_preset):
    model, loaded = _model(tiny_preset, method="freeze", freeze_layers=1, warmup_ratio=0.0)
    blocks = backbones.transformer_layers(loaded.backbone)
    frozen = backbones.embedding_layers(loaded.backbone) + blocks[:1]
    before_frozen, before_top = _snapshot(frozen), _snapshot(blocks[1:])
    before_head = _snapshot([model.get_layer("classifier")])
    x, y = _batch()
    model.train_on_batch(x, y)
    for a, b in zip(before_frozen, _snapshot(frozen)):
        np.testing.assert_array_equal(a, b)  # bit-identical
    assert any(not np.array_equal(a, b) for a, b in zip(before_top, _snapshot(blocks[1:])))
    after_head = _snapshot([model.get_layer("classifier")])
    assert any(not np.array_equal(a, b) for a, b in zip(before_head, after_head))


def test_head_only_training_counts_only_head_parameters(tiny_preset):
    model, _ = _model(tiny_preset, method="freeze", freeze_layers=-1)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 16 * 2 + 2  # Dense(hidden=16 -> 2 classes)


def test_weight_decay_skips_biases_and_layer_norms(tiny_preset):
    model, _ = _model(tiny_preset)
    opt = model.optimizer
    decayed = {v.path for v in model.trainable_variables if opt._use_weight_decay(v)}
    assert any(p.endswith("kernel") for p in decayed)
    assert not any(p.endswith(("bias", "gamma", "beta")) for p in decayed)


def test_fused_adamw_update_equals_keras_adamw_including_decay_clipping_and_sparse_grads():
    rng = np.random.default_rng(0)
    init = {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,)),
            "embeddings": rng.normal(size=(10, 4))}
    config = tiny_config(learning_rate=1e-2, weight_decay=0.1, clipnorm=0.5, warmup_ratio=0.2)

    def run(fused):
        variables = [keras.Variable(v.astype("float32"), name=n) for n, v in init.items()]
        opt = optim.build_optimizer(config, total_steps=5)
        opt._fused = fused
        for step in range(4):
            g = np.random.default_rng(step)
            grads = [tf.constant(g.normal(size=v.shape), tf.float32) for v in variables[:2]]
            # an embedding lookup's gradient arrives as IndexedSlices
            sparse = tf.IndexedSlices(tf.constant(g.normal(size=(3, 4)), tf.float32),
                                      tf.constant([1, 7, 1]), tf.constant([10, 4]))
            # (the reference gets the same gradient as a dense tensor, duplicates summed)
            grads.append(sparse if fused else tf.convert_to_tensor(sparse))
            opt.apply_gradients(zip(grads, variables))
        return [v.numpy() for v in variables], [v.numpy() for v in opt.variables]

    fused, reference = run(True), run(False)
    assert not np.allclose(fused[0][0], init["kernel"])
    for a, b in zip(fused[0] + fused[1], reference[0] + reference[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_warmup_then_linear_or_cosine_decay():
    lin = optim.WarmupDecay(1e-3, total_steps=100, warmup_steps=10, decay="linear")
    cos = optim.WarmupDecay(1e-3, total_steps=100, warmup_steps=10, decay="cosine")
    values = lambda s, steps: [float(s(t)) for t in steps]  # noqa: E731
    np.testing.assert_allclose(values(lin, [0, 5, 10, 55, 100]), [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)
    np.testing.assert_allclose(values(cos, [10, 55, 100]), [1e-3, 5e-4, 0], atol=1e-9)
    restored = optim.WarmupDecay.from_config(lin.get_config())
    assert float(restored(30)) == pytest.approx(float(lin(30)))


def test_balanced_class_weights_equalise_class_totals():
    ids = np.array([0] * 90 + [1] * 10)
    w = data.balanced_class_weights(ids, 2)
    assert w[0] * 90 == pytest.approx(w[1] * 10) == pytest.approx(50)


def test_classification_report_on_a_hand_made_case():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 0, 1])
    r = metrics.classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(3 / 6)
    third = 2 / 3
    expected_a = {"precision": third, "recall": third, "f1": third, "support": 3}
    assert r["per_class"]["a"] == pytest.approx(expected_a)
    assert r["per_class"]["b"]["precision"] == pytest.approx(1 / 3)
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0) / 3)
    assert r["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]


@pytest.mark.parametrize("pooling", ["pooled", "cls", "mean"])
def test_pooling_choices_ignore_padding_where_they_should(tiny_preset, pooling):
    model, _ = _model(tiny_preset, pooling=pooling)
    x, _ = _batch(n=2, length=6)
    x["padding_mask"][:] = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    changed = {k: v.copy() for k, v in x.items()}
    changed["token_ids"][:, 3:] = 7  # only padded positions differ
    np.testing.assert_allclose(model(x, training=False), model(changed, training=False), atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_pooler_the_head_does_not_read_is_frozen_not_trained(tiny_preset, pooling):
    model, loaded = _model(tiny_preset, pooling=pooling)
    pooler = next(layer for layer in loaded.backbone.layers if layer.name == "pooled_dense")
    before = _snapshot([pooler])
    assert not any(w.path.startswith("pooled_dense") for w in model.trainable_weights)
    assert any(w.path.startswith("classifier") for w in model.trainable_weights)
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Keras warns of variables without a gradient
        model.train_on_batch(x, y)
    for b, a in zip(before, _snapshot([pooler])):
        np.testing.assert_array_equal(b, a)
    pooled, _ = _model(tiny_preset, pooling="pooled")
    assert any(w.path.startswith("pooled_dense") for w in pooled.trainable_weights)


def test_strategy_selection():
    assert isinstance(distribute.get_strategy("cpu"), tf.distribute.OneDeviceStrategy)
    one = distribute.get_strategy("auto")
    assert isinstance(one, tf.distribute.OneDeviceStrategy) and one.num_replicas_in_sync == 1
    assert isinstance(distribute.get_strategy("mirrored"), tf.distribute.MirroredStrategy)
    with pytest.raises(FlagError, match="--strategy=tpu needs --tpu"):
        distribute.get_strategy("tpu")
    with pytest.raises(FlagError, match="unknown --strategy"):
        distribute.get_strategy("horovod")


def test_tpu_strategy_uses_the_resolver_and_initialises_the_system(monkeypatch):
    calls = {}

    class FakeResolver:
        def __init__(self, tpu):
            calls["tpu"] = tpu

    class FakeTPUStrategy:
        num_replicas_in_sync = 8

        def __init__(self, resolver):
            calls["strategy_resolver"] = resolver

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", FakeResolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                        lambda r: calls.setdefault("connect", r))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", lambda r: calls.setdefault("init", r))
    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    strategy = distribute.get_strategy("tpu", tpu="my-tpu")
    assert isinstance(strategy, FakeTPUStrategy)
    assert calls["tpu"] == "my-tpu"
    assert calls["connect"] is calls["init"] is calls["strategy_resolver"]
    assert distribute.uses_static_shapes(strategy)


@pytest.mark.parametrize("overrides,rate,why", [
    (dict(method="full"), 5e-5, "default for --method=full"),
    (dict(method="freeze", freeze_layers=3), 5e-5, "default for --method=freeze"),
    (dict(method="freeze", freeze_layers=-1), 1e-2, "default for --method=freeze --freeze_layers=-1"),
    (dict(method="full", freeze_layers=-1), 1e-2, "default for --method=full --freeze_layers=-1"),
    (dict(method="lora"), 3e-3, "default for --method=lora"),
    (dict(method="prompt"), 3e-2, "default for --method=prompt"),
    (dict(method="prefix"), 2e-2, "default for --method=prefix"),
    (dict(method="bitfit"), 3e-3, "default for --method=bitfit"),
    (dict(task="token_classification", method="lora"), 3e-3, "default for --method=lora"),
    (dict(task="causal_lm", method="full"), 2e-5, "default for --task=causal_lm --method=full"),
    (dict(task="causal_lm", method="lora"), 2e-4, "default for --task=causal_lm --method=lora"),
    (dict(task="causal_lm", method="prompt"), 3e-2, "default for --task=causal_lm --method=prompt"),
    (dict(task="causal_lm", method="bitfit"), 3e-3, "default for --method=bitfit"),  # no entry: the method's
])
def test_learning_rate_zero_means_the_methods_default(overrides, rate, why):
    assert Config().learning_rate == 0.0
    assert optim.peak_learning_rate(Config(**overrides)) == (rate, why)


def test_an_explicit_learning_rate_always_wins_and_a_negative_one_is_refused():
    assert optim.peak_learning_rate(Config(method="lora", learning_rate=1e-3)) == (1e-3, "--learning_rate")

    def peak(**overrides):  # with no warmup, step 0 trains at the peak rate
        return float(optim.build_optimizer(Config(warmup_ratio=0.0, **overrides), 10).learning_rate)

    assert peak(method="lora", learning_rate=1e-3) == pytest.approx(1e-3)
    assert peak(method="prefix") == pytest.approx(2e-2)
    with pytest.raises(FlagError, match=r"--learning_rate=-0.001: must be positive, or 0 for the method's"):
        optim.peak_learning_rate(Config(learning_rate=-1e-3))


def test_the_learning_rate_help_states_every_default_in_the_table():
    help_text = next(f for f in config_lib.fields() if f.name == "learning_rate").metadata["help"]
    generic, causal = help_text.split("--task=causal_lm:")
    for (task, method), rate in optim.LEARNING_RATES.items():
        text = "--freeze_layers=-1: " if method == "head_only" else f"{method} "
        assert text + optim.format_rate(rate) in (causal if task == "causal_lm" else generic), (task, method)


@pytest.mark.parametrize("overrides,line", [
    (dict(method="lora", learning_rate=0.0), "learning rate 3e-3 (default for --method=lora)"),
    (dict(learning_rate=1e-3), "learning rate 1e-3 (--learning_rate)"),
])
def test_the_run_logs_the_learning_rate_it_uses_and_why(overrides, line, tmp_path, caplog):
    missing = str(tmp_path / "missing.csv")  # the run stops at the data, after the learning-rate line
    # absl's logger carries its own level, which an earlier test may have raised: set it here
    with caplog.at_level("INFO", logger="absl"), pytest.raises(data.DataError, match="file not found"):
        trainer.train_and_evaluate(tiny_config(dataset="", train_file=missing, **overrides),
                                   str(tmp_path / "m"))
    assert line in caplog.text


def test_a_run_of_very_few_steps_warns_that_it_may_stay_near_chance(tiny_preset, tmp_path, caplog):
    from conftest import tiny_config
    from kft.training import trainer

    config = tiny_config(backbone=tiny_preset, max_train_examples=40, batch_size=16, epochs=2)
    with caplog.at_level("WARNING", logger="absl"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert "only 12 training steps (40 training examples, --batch_size=16, --epochs=2)" in caplog.text
    assert "raise --epochs" in caplog.text
