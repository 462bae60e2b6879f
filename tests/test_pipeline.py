"""train_and_evaluate end to end on the tiny backbone: outputs, determinism, early stopping."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_python, tiny_config
from kft.training import trainer


@pytest.fixture(scope="module")
def run(tiny_preset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = tiny_config(backbone=tiny_preset, epochs=2, export=True, export_dir=str(out / "exports"),
                         run_name="tiny", class_weights="balanced")
    model_dir = str(out / "model")
    return trainer.train_and_evaluate(config, model_dir), model_dir


def test_run_writes_metrics_plots_logs_and_a_versioned_export(run):
    result, model_dir = run
    with open(os.path.join(model_dir, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["eval"]["examples"] == 60 and 0 <= saved["eval"]["accuracy"] <= 1
    for key in ("macro_precision", "macro_recall", "macro_f1", "per_class", "confusion_matrix"):
        assert key in saved["eval"]
    assert saved["data"]["train"]["labels"] == {"negative": 120, "positive": 120}
    assert saved["data"]["train"]["truncated"] == 0
    assert saved["parameters"]["trainable"] == saved["parameters"]["total"] > 0
    assert saved["training"]["epochs_run"] == 2
    assert saved["training"]["class_weights"] == {"0": 1.0, "1": 1.0}
    assert len(os.listdir(os.path.join(model_dir, "best"))) == 1
    for png in ("training_curves.png", "confusion_matrix.png"):
        with open(os.path.join(model_dir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents")
               for _, _, files in os.walk(os.path.join(model_dir, "logs")) for n in files)
    assert result["export"].endswith(os.path.join("tiny", "1"))
    extra = os.path.join(result["export"], "assets.extra")
    assert open(os.path.join(extra, "labels.txt")).read() == "negative\npositive\n"
    meta = json.load(open(os.path.join(extra, "metadata.json")))
    assert meta["flags"]["backbone"] and meta["labels"] == ["negative", "positive"]
    last = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))[-1]
    assert last == f"ckpt-{36:08d}.safetensors"  # 2 epochs x 18 steps


def test_same_seed_same_data_same_result(tiny_preset, tmp_path):
    results = [trainer.train_and_evaluate(tiny_config(backbone=tiny_preset, seed=5), str(tmp_path / f"m{i}"))
               for i in range(2)]
    a, b = (r["training"]["history"][-1] for r in results)
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]
    c = trainer.train_and_evaluate(tiny_config(backbone=tiny_preset, seed=6), str(tmp_path / "m2"))
    assert c["training"]["history"][-1]["loss"] != a["loss"]


def test_early_stopping_stops_when_eval_accuracy_stalls(tiny_preset, tmp_path):
    # Steps of 1e-30 leave the weights unchanged, so eval accuracy never improves: patience 1 stops
    # after epoch 2. (A learning rate of 0 means the method's default.)
    result = trainer.train_and_evaluate(
        tiny_config(backbone=tiny_preset, epochs=6, learning_rate=1e-30, early_stopping_patience=1),
        str(tmp_path / "m"))
    assert result["training"]["epochs_run"] == 2


def test_tfds_dataset_trains_end_to_end(tiny_preset, tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        result = trainer.train_and_evaluate(tiny_config(dataset="imdb_reviews", backbone=tiny_preset),
                                            str(tmp_path / "m"))
    assert result["run_name"] == "imdb_reviews"
    assert result["data"]["train"]["source"] == "tfds:imdb_reviews/train"
    assert result["eval"]["examples"] == 24
    assert set(result["data"]["labels"]) == {"neg", "pos"}


def test_export_versions_increase(run, tiny_preset):
    result, _ = run
    from kft.models import savedmodel as export

    run_dir = os.path.dirname(result["export"])
    assert export.next_version(run_dir) == 2


MIRRORED = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, "tests")
from conftest import tiny_config
from kft.training import distribute
from kft.training import trainer
strategy = distribute.get_strategy("mirrored")
result = trainer.train_and_evaluate(tiny_config(backbone=sys.argv[1], strategy="mirrored"), sys.argv[2])
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "steps": result["training"]["steps"],
                  "eval_examples": result["eval"]["examples"]}))
"""


@pytest.mark.slow
def test_mirrored_strategy_trains_over_two_logical_cpus(tiny_preset, tmp_path):
    proc = run_python(["-c", MIRRORED, tiny_preset, str(tmp_path / "m")], env={"KFT_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"replicas": 2, "steps": 18, "eval_examples": 60}


WORKER = r"""
import json, os, sys
import numpy as np
sys.path.insert(0, "tests")
from conftest import tiny_config
from kft.training import trainer
preset, model_dir, strategy, out = sys.argv[1:5]
config = tiny_config(backbone=preset, strategy=strategy, dropout=0.0, epochs=2, batch_size=16)
trained = trainer.fit_model(config, model_dir)
np.savez(out, *[v.numpy() for v in trained.model.trainable_variables])
print(json.dumps({"steps": trained.metrics["training"]["steps"],
                  "workers": trained.metrics["training"]["workers"],
                  "accuracy": trained.metrics["eval"]["accuracy"]}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_worker_processes_end_with_equal_weights_matching_one_process(tiny_preset_no_dropout, tmp_path):
    """multi_worker_mirrored with two real workers on localhost vs one process, same global batch."""
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    model_dir = str(tmp_path / "mw")
    procs = []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KFT_QUIET": "1"}
    try:
        for i in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            # Files, not pipes: a worker blocked on a full pipe would stall the other in a collective.
            logs = (open(tmp_path / f"out{i}.txt", "w"), open(tmp_path / f"err{i}.txt", "w"))
            procs.append(subprocess.Popen(
                [sys.executable, "-c", WORKER, tiny_preset_no_dropout, model_dir, "multi_worker_mirrored",
                 str(tmp_path / f"worker{i}.npz")], cwd=ROOT, env={**env, "TF_CONFIG": tf_config},
                stdout=logs[0], stderr=logs[1]))
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [((tmp_path / f"out{i}.txt").read_text(), (tmp_path / f"err{i}.txt").read_text())
            for i in range(2)]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single = run_python(["-c", WORKER, tiny_preset_no_dropout, str(tmp_path / "one"), "one_device",
                         str(tmp_path / "single.npz")], env={"KFT_QUIET": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    assert [r["workers"] for r in reports] == [2, 2] and one["workers"] == 1
    assert reports[0]["steps"] == reports[1]["steps"] == one["steps"] == 36
    w0, w1, ws = (np.load(tmp_path / f"{n}.npz") for n in ("worker0", "worker1", "single"))
    diffs = [float(np.max(np.abs(w0[k] - ws[k]))) for k in w0.files]
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k])  # the workers agree exactly
    print(f"\nmulti-worker vs one process: {len(diffs)} variables, max |diff| = {max(diffs):.3g}")
    assert max(diffs) < 1e-4
    # Only the chief wrote checkpoints and outputs.
    assert os.path.exists(os.path.join(model_dir, "metrics.json"))


def test_a_megabyte_text_is_cut_and_counted_and_train_eval_duplicates_are_reported(tiny_preset, tmp_path):
    with open(os.path.join(ROOT, "kft", "sample_data", "reviews_train.tsv")) as f:
        header, *rows = f.read().splitlines()
    huge = "a truly wonderful film " * 45_000  # about 1 MB on one line
    train = tmp_path / "train.tsv"
    train.write_text("\n".join([header, *rows, f"{huge}\tpositive"]) + "\n")
    with open(os.path.join(ROOT, "kft", "sample_data", "reviews_test.tsv")) as f:
        _, *test_rows = f.read().splitlines()
    evalf = tmp_path / "eval.tsv"
    evalf.write_text("\n".join([header, *test_rows, *rows[:3]]) + "\n")  # 3 training rows leak
    result = trainer.train_and_evaluate(
        tiny_config(dataset="", backbone=tiny_preset, train_file=str(train), eval_file=str(evalf)),
        str(tmp_path / "m"))
    stats = result["data"]
    assert stats["train"]["examples"] == len(rows) + 1  # nothing dropped
    assert stats["train"]["cut_to_max_chars"] == 1 and stats["train"]["truncated"] >= 1
    assert stats["leakage"] == {"eval": 3}
    assert result["eval"]["examples"] == len(test_rows) + 3


def test_all_run_outputs_go_through_tf_io_gfile(tiny_preset, tmp_path, monkeypatch):
    """A ram:// model_dir (a TF filesystem like gs://) receives every output; nothing lands locally."""
    import tensorflow as tf

    monkeypatch.chdir(tmp_path)
    model_dir = "ram://kft-test/model"
    # drift=True: its plot is one more output that must go through tf.io.gfile
    trainer.train_and_evaluate(tiny_config(backbone=tiny_preset, checkpoint_every_steps=5, drift=True), model_dir)
    names = {n.rstrip("/") for n in tf.io.gfile.listdir(model_dir)}
    assert {"metrics.json", "labels.json", "training_curves.png", "confusion_matrix.png", "drift.png",
            "checkpoints", "best", "logs"} <= names
    assert tf.io.gfile.listdir(f"{model_dir}/checkpoints")
    resumed = trainer.train_and_evaluate(tiny_config(backbone=tiny_preset, checkpoint_every_steps=5, drift=True),
                                         model_dir)
    assert resumed["training"]["steps"] == 18  # found its checkpoints there and had nothing left to do
    assert os.listdir(tmp_path) == []
    tf.io.gfile.rmtree("ram://kft-test")


@pytest.mark.parametrize("jit", ["false", "true"])
def test_the_train_function_is_traced_once_for_all_batch_shapes(tiny_preset, tmp_path, jit):
    result = trainer.train_and_evaluate(
        tiny_config(backbone=tiny_preset, epochs=2, num_buckets=3, jit_compile=jit), str(tmp_path / "m"))
    training = result["training"]
    assert training["train_function_traces"] == 1
    assert training["static_shapes"] == (jit == "true")  # XLA: padded to bucket edges
    assert training["steps"] == 2 * training["steps_per_epoch"]


def test_mixed_bfloat16_computes_in_bfloat16_keeps_float32_weights_and_restores_the_policy(tiny_preset,
                                                                                            tmp_path):
    import keras
    import keras_hub

    trained = trainer.fit_model(tiny_config(backbone=tiny_preset, precision="mixed_bfloat16"), str(tmp_path))
    backbone = next(layer for layer in trained.model.layers if isinstance(layer, keras_hub.models.Backbone))
    assert backbone.compute_dtype == "bfloat16"
    assert {w.dtype for w in trained.model.trainable_weights} == {"float32"}
    ids = np.array([[2, 7, 9, 3]], np.int32)
    probabilities = trained.model({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    assert probabilities.dtype == "float32" and np.isfinite(probabilities.numpy()).all()
    assert np.isfinite(trained.metrics["training"]["history"][0]["loss"])
    assert keras.mixed_precision.global_policy().name == "float32"
