"""kft.bench: FLOP accounting, and the whole benchmark (three rows + serving) on a tiny backbone."""

import json
import os

import numpy as np
import pytest

from conftest import run_python
from kft import backbones, baselines, benchmark, perf, tasks


def test_non_embedding_parameters_are_the_transformer_pooler_and_head_weights(tiny_preset):
    loaded = backbones.load(tiny_preset)
    model = tasks.get("classification").build_model(loaded.backbone, 3, 0.0)
    h, i, layers = 16, 32, 2  # the tiny backbone's hidden size, feed-forward size, depth
    per_layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # attention, FFN, 2 LayerNorms
    assert perf.non_embedding_parameters(model) == layers * per_layer + (h * h + h) + (h * 3 + 3)


def test_kernel_matmuls_are_every_non_embedding_kernel_as_a_matmul(tiny_preset):
    loaded = backbones.load(tiny_preset)
    model = tasks.get("classification").build_model(loaded.backbone, 3, 0.0)
    h, i, layers = 16, 32, 2
    # query/key/value/output ([16, 2, 8] and [2, 8, 16] kernels) + pooler are h x h; FFN in/out; head.
    expected = {(h, h): 4 * layers + 1, (h, i): layers, (i, h): layers, (h, 3): 1}
    assert perf.kernel_matmuls(model, h) == expected


def test_matmul_floor_weights_each_kernel_shape_by_its_count_and_flops(monkeypatch):
    monkeypatch.setattr(perf, "_best_seconds", lambda fn, **kw: 1.0)  # one of each shape: 1 s
    f1, f2 = 6 * 10 * 4 * 8, 6 * 10 * 8 * 2
    assert perf.matmul_seconds({(4, 8): 3, (8, 2): 1}, rows=10) == pytest.approx((3 * f1 + f2) / (f1 + f2))


def test_training_floor_adds_matmuls_attention_at_their_rate_and_one_adam_pass_per_step():
    kernels = {(32, 64): 2, (64, 32): 2}
    floor = perf.training_floor(kernels, np.array([64, 64, 128]), attention_flops=1e6,
                                variable_shapes=[(32, 64), (64, 32), (64,)])
    assert floor["steps"] == 3 and floor["matmul_seconds"] > 0 and floor["adam_seconds"] > 0
    kernel_flops = sum(6.0 * n * 32 * 64 * 4 for n in (64, 64, 128))
    assert floor["kernel_rate"] == pytest.approx(kernel_flops / floor["matmul_seconds"])
    assert floor["attention_seconds"] == pytest.approx(1e6 / floor["kernel_rate"])
    assert floor["floor_seconds"] == pytest.approx(
        floor["matmul_seconds"] + floor["attention_seconds"] + floor["adam_seconds"])


def test_the_hf_row_runs_in_the_precision_of_kfts_row():
    assert baselines.hf_precision("float32") == {}
    assert baselines.hf_precision("mixed_bfloat16") == {"bf16": True}
    with pytest.raises(ValueError, match="no float16 autocast"):
        baselines.hf_precision("mixed_float16")


def test_training_flops_count_six_per_parameter_and_token_plus_attention():
    lengths = np.array([3, 5])
    flops = perf.training_flops(lengths.sum(), (lengths ** 2).sum(), parameters=1000, layers=2, hidden=8)
    assert flops == 6 * 1000 * 8 + 12 * 2 * 8 * (9 + 25)


def test_summary_derives_rates_efficiency_and_the_target_ratios():
    machine = {"tensorflow_matmul_rate": {"flops_per_second": 1e9}, "non_embedding_parameters": 100,
               "layers": 1, "hidden": 4, "cpus": 2, "cpu": "x"}

    def row(train, accuracy, status="full", steps=(10, 10)):
        return {"label": "r", "status": status,
                "seconds": {"setup": 1, "tokenize": 1, "train": train, "eval": 1},
                "train_examples": 100, "real_tokens": 1000.0, "real_tokens_squared": 20000.0,
                "padded_tokens": 1500.0, "dev_accuracy": accuracy, "steps_run": steps[0],
                "steps_full": steps[1], "peak_rss_bytes": 1e9}

    rows = {"kft": row(2.0, 0.90), "keras_hub": row(40.0, None, "subset", (2, 10)),
            "hf_trainer": row(5.0, 0.904)}
    rows["kft"]["floor"] = {"steps": 10, "floor_seconds": 0.5, "matmul_seconds": 0.3, "adam_seconds": 0.1,
                            "attention_seconds": 0.1, "kernel_rate": 8e8, "dtype": "float32"}
    serve = {"texts": "3 texts", "batch_1": {"p50_ms": 9.0, "p99_ms": 12.0},
             "batch_64": {"p50_ms": 200.0, "texts_per_second": 320.0}}
    report = benchmark.summarize(machine, rows, serve, benchmark.Config())
    kft = report["rows"]["kft"]
    assert kft["examples_per_second"] == 50 and kft["real_tokens_per_second"] == 500
    assert kft["compute_efficiency"] == pytest.approx((6 * 100 * 1000 + 12 * 4 * 20000) / 2.0 / 1e9)
    assert kft["padding_overhead"] == pytest.approx(0.5)
    assert kft["efficiency_ceiling"] == pytest.approx(kft["compute_efficiency"] * 4)  # 0.5 s floor, 2 s run
    assert "compute_efficiency_in_compute_dtype" not in kft  # float32: one rate
    assert report["rows"]["keras_hub"]["compute_efficiency"] == pytest.approx(kft["compute_efficiency"] / 20)
    assert report["ratios"]["kft_over_hf_train_time"] == pytest.approx(0.4)
    assert report["ratios"]["kft_over_keras_hub_train_time"] == pytest.approx(0.05)
    assert report["ratios"]["accuracy_points_below_hf"] == pytest.approx(0.4)
    t = report["targets"]
    assert t["kft_over_hf_train_time"]["met"] and t["serve_p50_ms_batch_1"]["met"]
    assert not t["kft_compute_efficiency"]["met"]
    text = benchmark.table(report)
    assert "40.0*" in text and "batch 1 p50 9.0 ms" in text and "NOT met" in text
    assert "floor for these 10 steps: 0.5 s" in text

    bf16 = dict(machine, compute_dtype="bfloat16", compute_dtype_matmul_rate={"flops_per_second": 2e9})
    report = benchmark.summarize(bf16, {"kft": dict(row(2.0, 0.9), floor=rows["kft"]["floor"])}, None,
                                 benchmark.Config())
    kft = report["rows"]["kft"]
    assert kft["compute_efficiency_in_compute_dtype"] == pytest.approx(kft["compute_efficiency"] / 2)
    assert kft["efficiency_ceiling_in_compute_dtype"] == pytest.approx(kft["efficiency_ceiling"] / 2)
    text = benchmark.table(report)
    assert "bfloat16 matmul rate: 2 GFLOP/s" in text
    assert f"{100 * kft['efficiency_ceiling_in_compute_dtype']:.1f}% of the bfloat16 rate" in text


@pytest.mark.slow
def test_bench_runs_all_rows_and_serving_in_fresh_processes(tiny_hf_folder, tmp_path):
    bench_dir = tmp_path / "bench"
    args = ["-m", "kft.bench", "--dataset=sample_reviews", f"--backbone={tiny_hf_folder}", "--batch_size=16",
            "--learning_rate=1e-3", f"--bench_dir={bench_dir}", "--baseline_max_steps=3",
            "--serve_requests=20"]
    done = run_python(args, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "system" in done.stdout and "dev acc" in done.stdout
    with open(bench_dir / "bench.json") as f:
        report = json.load(f)
    rows = report["rows"]
    expected_hf = "full" if baselines.hf_trainer_available() else "not run"
    assert {k: r["status"] for k, r in rows.items()} == {"kft": "full", "keras_hub": "subset",
                                                          "hf_trainer": expected_hf}
    kft = rows["kft"]
    assert kft["train_examples"] == 240 and kft["train_function_traces"] == 1
    assert 0 < kft["compute_efficiency"] < 1 and kft["peak_rss_bytes"] > 1e8
    assert kft["padded_tokens"] >= kft["real_tokens"]
    # the floor (matmuls and Adam alone) is below what the run really took, tracing aside
    assert 0 < kft["floor"]["floor_seconds"] < kft["seconds"]["train"] - kft["first_call_seconds"]
    assert kft["floor"]["steps"] == kft["steps_run"] and kft["efficiency_ceiling"] > kft["compute_efficiency"]
    assert rows["keras_hub"]["steps_run"] == 3 and rows["keras_hub"]["dev_accuracy"] is None
    assert report["ratios"]["kft_over_keras_hub_train_time"] > 0
    assert report["serve"]["batch_1"]["requests"] == 20 and report["serve"]["batch_1"]["p50_ms"] > 0
    with open(bench_dir / "bench.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    served = run_python(["-m", "kft.bench", "--mode=serve", f"--saved_model={kft['export']}",
                         "--serve_requests=10", f"--bench_dir={tmp_path / 'serve'}"], timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    result = json.loads(served.stdout[served.stdout.index("{"):])
    assert result["batch_1"]["requests"] == 10 and result["batch_64"]["texts_per_second"] > 0
    assert os.path.exists(tmp_path / "serve" / "serve.json")


def test_serve_mode_without_an_export_says_which_flag_is_missing(tmp_path):
    done = run_python(["-m", "kft.bench", "--mode=serve", f"--bench_dir={tmp_path}"], timeout=300)
    assert done.returncode == 2 and "needs --saved_model" in done.stderr and "Traceback" not in done.stderr


def test_an_unknown_row_is_refused():
    done = run_python(["-m", "kft.bench", "--rows=kft,trainer"], timeout=120)
    assert done.returncode != 0 and "unknown ['trainer']" in done.stderr
