"""The memory benchmark (kft/benchmarks/memory.py): random llama folders, fixed-shape rows, the fits
and the projection, and its flags."""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np
import pytest

import decoder_fixtures as fx
from conftest import ROOT, SHARED_DATA, run_python
from kft.benchmarks import memory, memory_fit as fit, memory_models as models, memory_rows as rows_lib
from kft.config import Config, FlagError

TINY = models.LlamaShape(hidden=32, layers=3, heads=4, kv_heads=2, intermediate=48,
                         vocab=len(fx.bpe_vocabulary()[0]))


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


@pytest.fixture(scope="module")
def tiny_random_folder(llama_folder, tmp_path_factory) -> str:
    # shards of at most 8 KB: several files, as the 1.7B folder has
    return models.write_llama_folder(str(tmp_path_factory.mktemp("memory") / "tiny"), TINY, llama_folder,
                                     shard_bytes=8 << 10)


def test_published_shapes_have_the_published_parameter_counts():
    counts = {name: shape.parameters()["total"] for name, shape in models.SIZES.items()}
    assert counts["135m"] == pytest.approx(134.5e6, rel=0.005)
    assert counts["360m"] == pytest.approx(361.8e6, rel=0.005)
    assert counts["1.7b"] == pytest.approx(1.711e9, rel=0.005)
    assert models.TARGET.parameters()["total"] == pytest.approx(8.03e9, rel=0.005)  # untied output matrix


def test_folder_writer_shards_every_tensor_as_bfloat16_with_an_index(tiny_random_folder):
    with open(os.path.join(tiny_random_folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    expected = dict(models._tensor_shapes(TINY))
    assert set(index["weight_map"]) == set(expected)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    held = {}
    for name in files:
        header = _header(os.path.join(tiny_random_folder, name))
        assert {k for k, v in index["weight_map"].items() if v == name} == set(header)
        held.update(header)
    assert {k: tuple(v["shape"]) for k, v in held.items()} == expected
    assert {v["dtype"] for v in held.values()} == {"BF16"}
    assert index["metadata"]["total_size"] == 2 * TINY.parameters()["total"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(tiny_random_folder, name))


def test_folder_writer_output_loads_as_a_decoder_with_the_requested_shape(tiny_random_folder):
    from kft.models import backbones

    with open(os.path.join(tiny_random_folder, "config.json")) as f:
        config = json.load(f)
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["torch_dtype"]) == \
        (32, 3, 4, 2, 48, "bfloat16")
    loaded = backbones.load_decoder(tiny_random_folder)
    model = loaded.backbone
    assert (loaded.num_layers, model.hidden_dim, model.num_query_heads, model.num_key_value_heads,
            model.intermediate_dim, model.vocabulary_size) == (3, 32, 4, 2, 48, TINY.vocab)
    assert model.count_params() == TINY.parameters()["total"]
    report = backbones.check_weights(loaded, tiny_random_folder)
    assert report == {"unused_tensors": [], "unmatched_weights": []}


def test_folder_writer_keeps_a_folder_written_for_the_same_shape(tiny_random_folder, llama_folder):
    index = os.path.join(tiny_random_folder, "model.safetensors.index.json")
    before = os.stat(index).st_mtime_ns
    models.write_llama_folder(tiny_random_folder, TINY, llama_folder, shard_bytes=8 << 10)
    assert os.stat(index).st_mtime_ns == before
    models.write_llama_folder(tiny_random_folder, dataclasses.replace(TINY, layers=2), llama_folder,
                              shard_bytes=8 << 10)
    with open(os.path.join(tiny_random_folder, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 2
    models.write_llama_folder(tiny_random_folder, TINY, llama_folder, shard_bytes=8 << 10)  # as the others expect


def test_fixed_rows_cut_and_pad_to_exactly_the_shape_and_count_real_tokens():
    sequences = [np.arange(1, 6), np.arange(10, 30), np.arange(40, 48)]
    rows = rows_lib.fixed_rows(sequences, starts=[2, 15, 3], length=8, pad_id=0)
    assert rows.ids.shape == (3, 8) and rows.ids.dtype == np.int32
    assert rows.lengths.tolist() == [5, 8, 8]
    assert rows.ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert rows.ids[1].tolist() == list(range(10, 18))  # cut to its first 8 tokens
    assert rows.padding_mask().sum(axis=1).tolist() == [5, 8, 8]
    labels, trained = rows.kft_labels()
    # position t predicts token t + 1 from the prompt's last position on; row 1's prompt fills the row
    assert labels[0].tolist() == [-1, 3, 4, 5, -1, -1, -1, -1]
    assert trained.tolist() == [3, 0, 5]
    assert ((rows.hf_labels() != rows_lib.HF_IGNORE).sum(axis=1) == trained).all()


def test_step_summary_times_steps_after_the_first_and_counts_their_real_tokens():
    rows = rows_lib.fixed_rows([np.arange(n) for n in (4, 6, 8, 8, 2, 8)], [1] * 6, length=8, pad_id=0)
    summary = rows_lib.step_summary([10.0, 2.0, 4.0], rows, batch=2)
    assert summary["seconds_per_step"] == 3.0
    assert summary["real_tokens_per_step"] == (16 + 10) / 2
    assert summary["real_tokens_per_second"] == pytest.approx(13 / 3)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "dialogsum", "train.jsonl")),
                    reason="DialogSum is not in ../shared/data")
def test_dialogsum_rows_are_kfts_rendered_examples_padded_to_the_fixed_shape(llama_folder):
    config = Config(task="causal_lm", train_file=os.path.join(SHARED_DATA, "dialogsum", "train.jsonl"),
                    eval_file=os.path.join(SHARED_DATA, "dialogsum", "dev.jsonl"), completion_field="summary",
                    prompt_template="Summarize the following dialogue.\n\n{dialogue}")
    rows = rows_lib.dialogsum_rows(config, llama_folder, batch=2, tokens=96, steps=3)
    assert rows.ids.shape == (6, 96)
    assert (rows.lengths <= 96).all() and (rows.lengths > 0).all()
    _, trained = rows.kft_labels()
    assert (trained > 0).all()  # the summary (cut to fit) and EOS are trained in every row
    assert (rows.starts < rows.lengths).all()


def _synthetic_rows(combo: models.Combo, truth: dict) -> list[dict]:
    """Rows whose memory follows the fitted model exactly, with known coefficients."""
    rows = []
    for size, (batch, tokens) in [("135m", (2, 512)), ("135m", (1, 1024)), ("360m", (2, 512)),
                                  ("1.7b", (2, 512))]:
        f = fit.features(models.SIZES[size], combo, batch, tokens, positions=60.0, lora_rank=8)
        ready = truth["a_ready"] + truth["b_ready"] * f["held_bytes"]
        activation = truth["a_act"] + truth["c"] * f["token_layer_hidden"] + truth["d"] * f["score_elements"]
        rows.append({"combo": combo.name, "status": "ok", "features": f, "batch": batch, "tokens": tokens,
                     "projected_positions": 60.0,
                     "memory": {"load_peak": truth["a_load"] + truth["b_load"] * f["float_bytes"], "ready_rss": ready,
                                "train_peak": ready + activation + f["logit_bytes"]}})
    return rows


TRUTH = {"a_load": 0.9e9, "b_load": 1.6, "a_ready": 0.7e9, "b_ready": 1.1, "a_act": 0.2e9, "c": 45.0, "d": 12.0}


def test_fit_recovers_known_coefficients_and_projects_with_them():
    combo = models.parse_combo("int4-standard")
    fits = fit.fit_combo(_synthetic_rows(combo, TRUTH))
    assert fits["load_peak"]["intercept"] == pytest.approx(TRUTH["a_load"], rel=1e-6)
    assert fits["load_peak"]["coefficients"]["float_bytes"] == pytest.approx(TRUTH["b_load"], rel=1e-6)
    assert fits["ready_rss"]["coefficients"]["held_bytes"] == pytest.approx(TRUTH["b_ready"], rel=1e-6)
    assert fits["activation"]["coefficients"]["token_layer_hidden"] == pytest.approx(TRUTH["c"], rel=1e-6)
    assert fits["activation"]["coefficients"]["score_elements"] == pytest.approx(TRUTH["d"], rel=1e-6)
    assert fits["activation"]["residual_rms"] < 1.0 and not fits["activation"]["dropped"]
    target = fit.features(models.TARGET, combo, 1, 2048, positions=300.0, lora_rank=8)
    p = fit.project(fits, target)
    ready = TRUTH["a_ready"] + TRUTH["b_ready"] * target["held_bytes"]
    training = TRUTH["a_act"] + TRUTH["c"] * target["token_layer_hidden"] + TRUTH["d"] * target["score_elements"] \
        + target["logit_bytes"]
    assert p["peak"] == pytest.approx(max(ready + training, TRUTH["a_load"] + TRUTH["b_load"] * target["float_bytes"]))
    assert p["device_estimate"] == pytest.approx(p["peak"] - TRUTH["a_ready"])


def test_memory_efficient_attention_fits_no_score_term_and_checkpointing_keeps_one_layer_of_scores():
    efficient = models.parse_combo("float-efficient")
    fits = fit.fit_combo(_synthetic_rows(efficient, {**TRUTH, "d": 0.0}))
    assert list(fits["activation"]["coefficients"]) == ["token_layer_hidden"]
    assert fits["activation"]["coefficients"]["token_layer_hidden"] == pytest.approx(TRUTH["c"], rel=1e-6)
    shape = models.SIZES["135m"]
    full = fit.features(shape, models.parse_combo("float-standard"), 2, 512, 0.0, 8)["score_elements"]
    kept = fit.features(shape, models.parse_combo("float-standard-ckpt"), 2, 512, 0.0, 8)["score_elements"]
    assert full == 2 * 9 * 512 ** 2 * 30 and kept == full / 30


def test_a_fit_with_fewer_rows_than_terms_drops_and_names_the_last_terms():
    short = fit.least_squares(np.array([[1.0, 5.0], [2.0, 3.0]]), np.array([10.0, 20.0]), ("x", "y"))
    assert short["dropped"] == ["y"] and short["exact"]
    assert short["coefficients"]["x"] == pytest.approx(10.0)
    constant = fit.least_squares(np.array([[4.0], [4.0], [4.0]]), np.array([1.0, 2.0, 3.0]), ("x",))
    assert constant["dropped"] == ["x"] and constant["intercept"] == pytest.approx(2.0)


def test_int_bases_hold_fewer_bytes_than_float_and_keep_embeddings_float():
    shape = models.TARGET
    float_, int8, int4 = (fit.held_bytes(shape, b, 8) for b in ("float", "int8", "int4"))
    p = shape.parameters()
    assert float_ > int8 > int4 > 4 * p["embedding"]
    adapters = 16 * shape.lora_parameters(8)  # LoRA factors, gradients, two Adam moments
    # every 8B projection has a multiple of 128 inputs: one float32 scale per 128 int4 weights
    assert int4 - adapters == pytest.approx(4 * (p["embedding"] + p["norm"]) + (0.5 + 4 / 128) * p["projection"])
    assert float_ - adapters == pytest.approx(4 * p["total"])


@pytest.mark.parametrize("name", ["fp16-standard", "float-flash", "float-standard-ckpt-ckpt", "hf", "hf-eager",
                                  "int4"])
def test_unknown_combinations_are_refused_with_the_grammar(name):
    with pytest.raises(FlagError, match=r"unknown combination .*<base>-<attention>\[-ckpt\].*hf-sdpa"):
        models.parse_combos(["float-standard", name])


def test_combinations_map_to_kft_flags_and_repeats_sizes_and_shapes_are_refused():
    combo = models.parse_combo("int8-efficient-ckpt")
    assert combo.kft_flags() == ["--base_quantization=int8", "--attention=memory_efficient",
                                 "--gradient_checkpointing"]
    assert models.parse_combo("hf-sdpa-ckpt") == models.Combo("hf-sdpa-ckpt", "hf", "float", "sdpa", True)
    with pytest.raises(FlagError, match="named twice"):
        models.parse_combos(["hf-sdpa", "hf-sdpa"])
    with pytest.raises(FlagError, match=r"unknown \['7b'\]"):
        memory.parse_sizes(["135m", "7b"])
    with pytest.raises(FlagError, match="<batch>x<tokens>"):
        memory.parse_shape("512")
    assert memory.parse_shape("2x512") == (2, 512)


def test_bench_refuses_a_bad_combination_before_measuring_anything():
    from absl import flags

    from kft import bench
    from kft import config as config_lib

    fv = flags.FlagValues()
    bench.define_flags(fv)
    fv(["prog", f"--flagfile={os.path.join(ROOT, 'flags', 'bench_memory.cfg')}", "--memory_combos=float-fast"])
    with pytest.raises(FlagError, match="unknown combination 'float-fast'"):
        memory.options_from_flags(fv, config_lib.from_flags(fv))
    fv(["prog", "--memory_combos=float-efficient", "--memory_steps=1"])
    with pytest.raises(FlagError, match="--memory_steps=1"):
        memory.options_from_flags(fv, config_lib.from_flags(fv))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "dialogsum", "train.jsonl")),
                    reason="DialogSum is not in ../shared/data")
def test_memory_mode_runs_end_to_end_on_a_tiny_size(tmp_path):
    """The whole mode in a fresh interpreter with one tiny size registered: a kft row and a Trainer row,
    each in its own process, then the fits and the projection."""
    script = ("from kft.benchmarks import memory_models as m; "
              "m.SIZES['tiny'] = m.LlamaShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48); "
              "from kft import bench; bench.run()")
    combos = "float-efficient,hf-sdpa" if memory_hf_available() else "float-efficient"
    done = run_python(["-c", script, "--flagfile=flags/bench_memory.cfg", "--mode=memory", "--memory_sizes=tiny",
                       f"--memory_combos={combos}", "--memory_probe_shape=", "--sequence_length=64",
                       f"--bench_dir={tmp_path}", f"--memory_models_dir={tmp_path / 'models'}"], timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "bench_memory.json") as f:
        report = json.load(f)
    assert [r["status"] for r in report["rows"]] == ["ok"] * len(combos.split(","))
    for row in report["rows"]:
        assert row["batch"] == 2 and row["tokens"] == 64 and len(row["step_seconds"]) == 3
        assert row["memory"]["peak"] >= row["memory"]["train_peak"] > 0 and row["seconds_per_step"] > 0
    assert "PROJECTION" in (tmp_path / "bench_memory.md").read_text()


def memory_hf_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft", "accelerate"))
