"""kft.bench --task=causal_lm: the Hugging Face Trainer + PEFT row against kft's on a tiny random llama
folder (tests/decoder_fixtures.py) and a dozen chats: the same tokens trained, the same loss, the
summary, and the whole command with both rows and serving."""

import json
import math

import numpy as np
import pytest

import decoder_fixtures as fx
from conftest import run_python
from kft.benchmarks import hf_peers as baselines
from kft.benchmarks import rows as benchmark

needs_hf = pytest.mark.skipif(bool(baselines.hf_trainer_missing(benchmark.Config(task="causal_lm",
                                                                               method="lora"))),
                              reason="torch, transformers, accelerate or peft not installed (pip install -e '.[bench]')")


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    """(llama folder, train file, dev file): 12 training chats and 4 dev chats."""
    root = tmp_path_factory.mktemp("bench_lm")
    folder = fx.write_llama_folder(str(root / "llama"))
    words = fx.TEXT.split()
    files = []
    for name, n, seed in (("train", 12, 0), ("dev", 4, 1)):
        rng = np.random.default_rng(seed)
        path = root / f"{name}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                record = {"messages": [
                    {"role": "user", "content": " ".join(rng.choice(words, rng.integers(3, 12)))},
                    {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 5)))}]}
                f.write(json.dumps(record) + "\n")
        files.append(str(path))
    return folder, files[0], files[1]


def _flags(lm_setup, bench_dir) -> list[str]:
    folder, train, dev = lm_setup
    return ["--task=causal_lm", f"--backbone={folder}", f"--train_file={train}", f"--eval_file={dev}",
            "--batch_size=4", "--learning_rate=1e-3", "--max_new_tokens=4", "--method=lora",
            "--lora_targets=query,key,value,attention_output,gate,up,down", "--checkpoint_every_steps=0",
            f"--bench_dir={bench_dir}"]


def _config(lm_setup, **overrides):
    folder, train, dev = lm_setup
    base = dict(task="causal_lm", backbone=folder, train_file=train, eval_file=dev, batch_size=4,
                learning_rate=1e-3, max_new_tokens=4, method="lora", export=False, checkpoint_every_steps=0,
                lora_targets=["query", "key", "value", "attention_output", "gate", "up", "down"])
    base.update(overrides)
    return benchmark.Config(**base)


@needs_hf
def test_the_hf_rows_tokens_labels_and_untrained_loss_are_kfts(lm_setup, tmp_path):
    """Same records, prompts, packing and completion-only labels as kft; on the untrained model the
    per-token eval loss equals kft's zero-shot loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kft.models import backbones
    from kft.training import trainer
    from kft.tasks.causal_lm import inputs as lm_inputs, task as lm_task

    config = _config(lm_setup, epochs=0, max_new_tokens=0, model_dir=str(tmp_path / "m"))
    folder = lm_setup[0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    examples = baselines.lm_examples(config, folder, tokenizer, model.config)

    loaded = backbones.load_decoder(folder)
    data = lm_task.load_data(config)
    template = lm_task._chat_template(config, loaded, data.train)
    assert examples.text.chat_template == template and examples.text.eos_id == loaded.eos_id
    for k, split in (("train", data.train), ("eval", data.eval)):
        ours = lm_inputs.encode(split, loaded, template, examples.sequence_length, False, None, None, False)
        _, _, labels, sizes = lm_inputs.matrices(ours, loaded.pad_id, False)
        assert [x.tolist() for x in examples.encoded[k].ids] == [x.tolist() for x in ours.ids]
        assert examples.encoded[k].prompt_texts == ours.prompt_texts
        for row, kft_labels, seq in zip(examples.rows[k], labels, ours.ids):
            # the Trainer shifts labels itself: position t's target in kft is the label at t + 1 here
            assert row["labels"][1:] == [int(t) if t >= 0 else -100 for t in kft_labels[:len(seq) - 1]]
        assert baselines._trained(examples.rows[k]) == int(sizes.sum())

    metrics = trainer.train_and_evaluate(config, str(tmp_path / "m"))
    loss = baselines._lm_eval_loss(model.eval(), examples.rows["eval"], 3, examples.text.pad_id,
                                   torch.no_grad)
    assert loss == pytest.approx(metrics["eval"]["loss"], abs=2e-4)


@needs_hf
@pytest.mark.slow
def test_the_hf_row_runs_in_a_fresh_process_and_reports_loss_speed_and_scores(lm_setup, tmp_path):
    out = tmp_path / "hf.json"
    done = run_python(["-m", "kft.bench", *_flags(lm_setup, tmp_path), "--mode=row", "--row=hf_trainer",
                       f"--row_output={out}"], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["label"] == "Hugging Face Trainer + PEFT" and row["status"] == "full"
    assert math.isfinite(row["eval_loss"]) and row["eval_loss"] > 0
    assert row["real_tokens"] / row["seconds"]["train"] > 0 and row["padded_tokens"] >= row["real_tokens"]
    assert {"rouge1", "rouge2", "rougeL", "bleu"} <= set(row) and row["generation"]["examples"] == 4
    assert row["train_examples"] == 12 and row["steps_run"] == 3 and row["trained_tokens"] > 0
    # LoRA r=8 on the 7 projections of 2 layers (hidden 32, kv 16, intermediate 64): r * (in + out)
    h, kv, i = 32, 16, 64
    per_layer = 8 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert row["trainable_parameters"] == 2 * per_layer
    assert row["software"]["torch_threads"] >= 1 and row["software"]["peft"]


def test_causal_lm_runs_kft_and_the_trainer_and_refuses_keras_hub():
    every = list(benchmark.ROWS)
    assert benchmark.choose_rows("causal_lm", every, explicit=False) == ["kft", "hf_trainer"]
    with pytest.raises(benchmark.FlagError, match="causal_lm has no keras_hub row.*choose from kft, hf_trainer"):
        benchmark.choose_rows("causal_lm", ["kft", "keras_hub"], explicit=True)
    assert benchmark.label("hf_trainer", "causal_lm", "lora") == "Hugging Face Trainer + PEFT"
    assert benchmark.label("hf_trainer", "causal_lm", "full") == "Hugging Face Trainer"


@pytest.mark.slow
def test_asking_for_the_keras_hub_row_of_causal_lm_is_one_clear_line(tmp_path):
    done = run_python(["-m", "kft.bench", "--task=causal_lm", "--rows=keras_hub", f"--bench_dir={tmp_path}"],
                      timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--task=causal_lm has no keras_hub row" in done.stderr


def test_the_causal_lm_summary_shows_loss_scores_trained_tokens_targets_and_first_token_time():
    machine = {"tensorflow_matmul_rate": {"flops_per_second": 1e9}, "non_embedding_parameters": 100,
               "head_parameters": 40, "layers": 1, "hidden": 4, "cpus": 2, "cpu": "x"}

    def row(label, train, loss, rouge, bleu):
        return {"label": label, "status": "full",
                "seconds": {"setup": 1, "tokenize": 1, "train": train, "eval": 2},
                "train_examples": 12, "real_tokens": 600.0, "real_tokens_squared": 2000.0,
                "padded_tokens": 800.0, "trained_tokens": 90, "trained_tokens_run": 90,
                "eval_trained_tokens": 20, "trainable_parameters": 8192, "eval_loss": loss, "rougeL": rouge,
                "bleu": bleu, "dev_accuracy": None, "peak_rss_bytes": 2e9,
                "generation": {"examples": 4, "seconds": 1.0, "mean_tokens": 3.0}}

    rows = {"kft": row("kft", 4.0, 2.01, 30.0, 10.0), "hf_trainer": row("Hugging Face Trainer + PEFT", 10.0,
                                                                      2.0, 30.4, 11.0)}
    serve = {"prompts": "4 inputs", "time_to_first_token": {"requests": 4, "p50_ms": 120.0, "p90_ms": 150.0},
             "batch_1": {"requests": 4, "p50_ms": 900.0, "decode_tokens_per_second": 40.0},
             "batch_16": {"requests": 3, "p50_ms": 3000.0, "generated_tokens_per_second": 200.0}}
    report = benchmark.summarize(machine, rows, serve, benchmark.Config(task="causal_lm"))
    kft = report["rows"]["kft"]
    assert kft["real_tokens_per_second"] == 150 and kft["padding_share"] == pytest.approx(0.25)
    # 6 FLOPs per non-embedding parameter and token, attention, and the head at trained positions
    assert kft["flops"] == 6 * 100 * 600 + 12 * 1 * 4 * 2000 + 6 * 40 * 90
    ratios = report["ratios"]
    assert ratios["kft_over_hf_train_time"] == pytest.approx(0.4)
    assert ratios["eval_loss_above_hf"] == pytest.approx(0.01)
    assert ratios["rougeL_points_below_hf"] == pytest.approx(0.4)
    assert ratios["serve_time_to_first_token_s_batch_1"] == pytest.approx(0.12)
    assert "serve_p50_ms_batch_1" not in ratios  # a decoder's batch-1 latency is a whole generation
    assert set(report["targets"]) == set(benchmark.LM_TARGETS)
    assert all(t["met"] for t in report["targets"].values())
    text = benchmark.table(report)
    assert "eval loss" in text and "ROUGE-L" in text and "dev acc" not in text
    assert "2.0100" in text and "30.40" in text and "25%" in text
    assert "trained tokens per epoch: kft 90, Hugging Face 90 (the same)" in text
    assert "time to first token p50 120 ms" in text and "200.0 generated tokens/s" in text
    assert "target serve_time_to_first_token_s_batch_1: 0.120 (target <= 0.5) met" in text


@needs_hf
@pytest.mark.slow
def test_bench_runs_kft_and_the_trainer_then_serves_the_decoder_export(lm_setup, tmp_path):
    bench_dir = tmp_path / "bench"
    done = run_python(["-m", "kft.bench", *_flags(lm_setup, bench_dir), "--serve_requests=4"], timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "eval loss" in done.stdout and "time to first token" in done.stdout
    report = json.loads((bench_dir / "bench.json").read_text())
    rows = report["rows"]
    assert {k: r["status"] for k, r in rows.items()} == {"kft": "full", "hf_trainer": "full"}
    kft, hf = rows["kft"], rows["hf_trainer"]
    # the fairness check: the same examples and the same tokens, trained and scored, in both rows
    for key in ("train_examples", "trained_tokens", "eval_trained_tokens", "real_tokens",
                "trainable_parameters"):
        assert kft[key] == hf[key], key
    for r in (kft, hf):
        assert math.isfinite(r["eval_loss"]) and r["real_tokens_per_second"] > 0 and 0 <= r["padding_share"] < 1
        assert r["rougeL"] is not None and r["bleu"] is not None and r["peak_rss_bytes"] > 1e8
        assert 0 < r["compute_efficiency"] < 1
    assert set(report["targets"]) == set(benchmark.LM_TARGETS)
    assert report["serve"]["time_to_first_token"]["p50_ms"] > 0
    assert (bench_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
