"""kft.bench: FLOP accounting, and the whole benchmark (three rows + serving) on a tiny backbone."""

import json
import os

import numpy as np
import pytest

from conftest import run_python
from kft import tasks
from kft.models import backbones
from kft.benchmarks import hf_peers as baselines
from kft.benchmarks import rows as benchmark
from kft.benchmarks import perf


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


@pytest.mark.slow
def test_serve_mode_without_an_export_says_which_flag_is_missing(tmp_path):
    done = run_python(["-m", "kft.bench", "--mode=serve", f"--bench_dir={tmp_path}"], timeout=300)
    assert done.returncode == 2 and "needs --saved_model" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_an_unknown_row_is_refused():
    done = run_python(["-m", "kft.bench", "--rows=kft,trainer"], timeout=120)
    assert done.returncode != 0 and "unknown ['trainer']" in done.stderr


def _qa_window(start, end, context):
    """One window's logits (start, end at the given tokens = 5.0, else 0) and its tokens' offsets."""
    n = len(context)
    s, e = np.zeros(n), np.zeros(n)
    for i, v in start.items():
        s[i] = v
    for i, v in end.items():
        e[i] = v
    offsets = np.array([[10 * i, 10 * i + 5] for i in range(n)])
    return s, e, offsets, np.asarray(context, bool)


def test_the_hf_qa_decoding_never_picks_end_before_start_nor_outside_the_context():
    ctx = [False, False, False, True, True, True, True, False]  # [CLS] q q | c c c c | [SEP]
    # the highest start (6) lies after the highest end (4); the question tokens score higher still
    s, e, offsets, mask = _qa_window({1: 9.0, 6: 5.0, 3: 1.0}, {2: 9.0, 4: 5.0, 6: 2.0}, ctx)
    span = baselines._best_span(s, e, offsets, mask, n_best=20, max_answer_length=30)
    assert (span.window, span.start, span.end) == (0, 6, 6)  # 5 + 2 beats start 3 + end 4 (1 + 5)
    assert (span.char_start, span.char_end) == (60, 65) and span.score == pytest.approx(7.0)
    s[6] = 0.0  # now start 3 + end 4 is the best valid pair
    span = baselines._best_span(s, e, offsets, mask, n_best=20, max_answer_length=30)
    assert (span.start, span.end, span.char_start, span.char_end) == (3, 4, 30, 45)
    for n_best in (1, 2, 3, 8):
        span = baselines._best_span(s, e, offsets, mask, n_best=n_best, max_answer_length=30)
        assert span is None or (span.end >= span.start and mask[span.start] and mask[span.end])
    # n_best=1: only start 1 and end 2 are candidates, both in the question: no answer
    assert baselines._best_span(s, e, offsets, mask, n_best=1, max_answer_length=30) is None


def test_the_hf_qa_decoding_limits_the_answer_length_and_takes_the_best_window():
    ctx = [False, True, True, True, True, True, False]
    s, e, offsets, mask = _qa_window({1: 5.0, 4: 0.2}, {5: 5.0, 4: 0.5}, ctx)
    long = baselines._best_span(s, e, offsets, mask, n_best=20, max_answer_length=5)
    assert (long.start, long.end) == (1, 5)  # 5 tokens: allowed
    short = baselines._best_span(s, e, offsets, mask, n_best=20, max_answer_length=4)
    assert (short.start, short.end) == (1, 4)  # 1..5 is 5 tokens: 1..4 (5.5) beats 4..5 (5.2)
    # two windows of one question: the second holds the better pair; its offsets give the characters
    s2, e2, offsets2, _ = _qa_window({2: 7.0}, {3: 7.0}, ctx)
    offsets2 = offsets2 + 100
    span = baselines._best_span(np.stack([s, s2]), np.stack([e, e2]), np.stack([offsets, offsets2]),
                                np.stack([mask, mask]), n_best=20, max_answer_length=30)
    assert (span.window, span.start, span.end, span.char_start, span.char_end) == (1, 2, 3, 120, 135)
    # a tie keeps the first window
    span = baselines._best_span(np.stack([s2, s2]), np.stack([e2, e2]), np.stack([offsets, offsets2]),
                                np.stack([mask, mask]), n_best=20, max_answer_length=30)
    assert span.window == 0
    # a window whose context is all masked out never answers
    span = baselines._best_span(np.stack([s2, s]), np.stack([e2, e]), np.stack([offsets, offsets]),
                                np.stack([np.zeros_like(mask), mask]), n_best=20, max_answer_length=30)
    assert span.window == 1 and (span.start, span.end) == (1, 5)


def test_the_hf_qa_labels_point_at_the_answer_tokens_or_at_cls_outside_the_window():
    from kft.tasks.question_answering.data import Question, Questions

    context = "aaaa bbbb cccc dddd"  # four words; two windows: words 0-2 and words 2-3
    questions = Questions("t", "t", [Question("q", "?", context, [("cccc dddd", 10)]),
                                     Question("n", "?", context, [])])
    # [CLS] ? [SEP] ctx... [SEP]; offsets of the context tokens, question tokens masked out
    offsets = np.array([[[0, 0], [0, 1], [0, 0], [0, 4], [5, 9], [10, 14], [0, 0]],
                        [[0, 0], [0, 1], [0, 0], [10, 14], [15, 19], [0, 0], [0, 0]],
                        [[0, 0], [0, 1], [0, 0], [0, 4], [5, 9], [10, 14], [0, 0]]])
    mask = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0]], bool)
    ids = np.full((3, 7), 7)
    ids[:, 0] = 101
    starts, ends = baselines._qa_labels(questions, np.array([0, 0, 1]), offsets, mask, ids, cls_id=101)
    assert list(starts) == [0, 3, 0] and list(ends) == [0, 4, 0]  # window 0 lacks "dddd": CLS
    peak_at = lambda i: np.where(np.arange(7) == i, 4.0, 0.0)[None].repeat(3, 0)  # noqa: E731
    predictions = baselines._qa_predictions(questions, np.array([0, 0, 1]), offsets, mask, peak_at(3),
                                            peak_at(4), n_best=20, max_answer_length=30, null_threshold=None)
    assert predictions == {"q": "aaaa bbbb", "n": "aaaa bbbb"}  # window 0 first on the tie
    predictions = baselines._qa_predictions(
        questions, np.array([0, 0, 1]), offsets, mask, np.full((3, 7), 1.0), np.full((3, 7), 1.0),
        n_best=20, max_answer_length=30, null_threshold=0.0)
    assert predictions == {"q": "aaaa", "n": "aaaa"}  # null score 2 does not beat the span's 2


def test_question_answering_runs_kft_and_run_qa_and_refuses_keras_hub():
    every = list(benchmark.ROWS)
    assert benchmark.choose_rows("question_answering", every, explicit=False) == ["kft", "hf_trainer"]
    assert benchmark.choose_rows("classification", every, explicit=False) == every
    with pytest.raises(benchmark.FlagError, match="no keras_hub row.*choose from kft, hf_trainer"):
        benchmark.choose_rows("question_answering", ["kft", "keras_hub"], explicit=True)
    assert benchmark.label("hf_trainer", "question_answering") == "Hugging Face run_qa (Trainer)"


def test_the_question_answering_summary_shows_exact_match_f1_windows_and_the_time_ratio():
    machine = {"tensorflow_matmul_rate": {"flops_per_second": 1e9}, "non_embedding_parameters": 100,
               "layers": 1, "hidden": 4, "cpus": 2, "cpu": "x"}

    def row(label, train, em, f1):
        return {"label": label, "status": "full",
                "seconds": {"setup": 1, "tokenize": 1, "train": train, "eval": 1},
                "train_examples": 200, "real_tokens": 600.0, "real_tokens_squared": 2000.0,
                "padded_tokens": 800.0, "exact_match": em, "f1": f1, "dev_accuracy": None,
                "questions": {"train": 90, "eval": 30}, "windows": 100, "peak_rss_bytes": 2e9}

    rows = {"kft": row("kft", 4.0, 70.0, 80.0),
            "hf_trainer": row("Hugging Face run_qa (Trainer)", 10.0, 71.0, 80.5)}
    config = benchmark.Config(task="question_answering")
    report = benchmark.summarize(machine, rows, None, config)
    kft = report["rows"]["kft"]
    assert kft["windows_per_second"] == 50 and kft["padding_share"] == pytest.approx(0.25)
    assert report["ratios"]["kft_over_hf_train_time"] == pytest.approx(0.4)
    assert report["ratios"]["exact_match_points_below_hf"] == pytest.approx(1.0)
    assert report["ratios"]["f1_points_below_hf"] == pytest.approx(0.5)
    assert "accuracy_points_below_hf" not in report["ratios"]
    text = benchmark.table(report)
    assert "dev EM" in text and "dev F1" in text and "windows/s" in text and "dev acc" not in text
    assert "70.00" in text and "80.50" in text and "25%" in text and "2.00 GB" in text
    assert "kft train time / Hugging Face train time: 0.400" in text and "floor: n/a" in text
