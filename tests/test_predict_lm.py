"""`python -m kft.predict` on the generating SavedModel of a decoder run (--task=causal_lm): it prints
the completions the in-memory run generated, --raw takes prompts already formatted, cut prompts are
counted, and a user's mistakes get one line naming the flag or file. One tiny LoRA run on a random
llama (tests/decoder_fixtures.py) serves the whole module."""

from __future__ import annotations

import json
import os

import pytest

import decoder_fixtures as fx
from conftest import run_python

FIELDS = {"prompt", "completion", "completion_tokens", "stopped", "prompt_tokens_cut"}


@pytest.fixture(scope="module")
def decoder_run(chat_run):
    """A LoRA run on tiny chats, exported (tests/conftest.py's chat_run, shared with
    tests/test_lm_export.py): (SavedModel path, the rows of its predictions.jsonl)."""
    _, path, model_dir = chat_run
    with open(os.path.join(model_dir, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return path, rows


@pytest.fixture(scope="module")
def classifier(tiny_classifier_export) -> str:
    """An untrained classification export: a SavedModel without generate_raw (tests/conftest.py's,
    shared with tests/test_export.py)."""
    return tiny_classifier_export[0]


def _predict(*args: str):
    """Runs the kft.predict CLI in a fresh process: (exit status, printed JSON lines, stderr)."""
    proc = run_python(["-m", "kft.predict", *args])
    lines = [json.loads(line) for line in proc.stdout.splitlines()] if proc.returncode == 0 else []
    return proc.returncode, lines, proc.stderr


@pytest.mark.slow
def test_a_decoder_export_prints_the_completions_the_run_generated(decoder_run, tmp_path):
    path, rows = decoder_run
    listing = tmp_path / "prompts.txt"
    listing.write_text("".join(r["input"] + "\n" for r in rows))
    status, lines, err = _predict(f"--model={path}", f"--input_file={listing}", "--batch_size=4")
    assert status == 0, err[-3000:]
    assert all(set(d) == FIELDS for d in lines)
    assert [d["prompt"] for d in lines] == [r["input"] for r in rows]
    assert [d["completion"] for d in lines] == [r["prediction"] for r in rows]
    assert [d["stopped"] for d in lines] == [r["stopped"] for r in rows]
    assert all(0 <= d["completion_tokens"] <= 8 and d["prompt_tokens_cut"] == 0 for d in lines)
    assert "cut" not in err


@pytest.mark.slow
def test_a_labelled_file_is_served_and_scored_as_the_run_scored_its_own_generations(decoder_run, tmp_path):
    from kft.reporting import metrics

    path, rows = decoder_run
    listing = fx.write_jsonl(tmp_path / "labelled.jsonl", [{"question": r["input"], "answer": r["reference"]}
                                                            for r in rows])
    status, lines, err = _predict(f"--model={path}", f"--input_file={listing}", "--prompt_field=question",
                                  "--reference_field=answer", "--max_examples=6")
    assert status == 0, err[-3000:]
    assert [d["completion"] for d in lines] == [r["prediction"] for r in rows[:6]]
    scored = [line for line in err.splitlines() if line.startswith("scores of 6 completions against answer: ")]
    expected = metrics.generation_scores([r["prediction"] for r in rows[:6]], [r["reference"] for r in rows[:6]])
    assert len(scored) == 1 and json.loads(scored[0].split(": ", 1)[1]) == expected
    misshapen = fx.write_jsonl(tmp_path / "unlabelled.jsonl", [{"question": "hello"}])
    line = _error(f"--model={path}", f"--input_file={misshapen}", "--prompt_field=question",
                  "--reference_field=answer")
    assert line == f"error: {misshapen}:1: no string field answer"


@pytest.mark.slow
def test_prompts_given_as_arguments_are_served_and_cut_ones_counted_in_one_line(decoder_run):
    path, rows = decoder_run
    # 80 x 7 words and the chat template do not fit in 256 positions less 8 new tokens
    long = " ".join(["paris is the capital of france ."] * 80)
    status, lines, err = _predict(f"--model={path}", rows[0]["input"], long, "--batch_size=1")
    assert status == 0, err[-3000:]
    assert [d["prompt"] for d in lines] == [rows[0]["input"], long]
    assert lines[0]["completion"] == rows[0]["prediction"] and lines[0]["prompt_tokens_cut"] == 0
    assert lines[1]["prompt_tokens_cut"] > 0 and lines[1]["completion_tokens"] > 0
    assert [line for line in err.splitlines() if "cut" in line] == [
        "1 of 2 prompt(s) cut from the start to leave room for the completion in the model's context "
        "(prompt_tokens_cut: tokens cut)"]


@pytest.mark.slow
def test_raw_takes_prompts_already_formatted_from_a_jsonl_file(decoder_run, tmp_path):
    path, rows = decoder_run
    with open(os.path.join(path, "assets.extra", "metadata.json")) as f:
        generation = json.load(f)["generation"]
    formatted = [generation["prompt_prefix"] + r["input"] + generation["prompt_suffix"] for r in rows]
    assert all("\n" in p for p in formatted)  # the chat template's line breaks: one JSON line each
    listing = fx.write_jsonl(tmp_path / "formatted.jsonl", [{"prompt": p} for p in formatted])
    status, lines, err = _predict(f"--model={path}", f"--input_file={listing}", "--raw")
    assert status == 0, err[-3000:]
    assert [d["prompt"] for d in lines] == formatted
    # generate_raw on the rendered template = serving_default on the user's text (the run's completions)
    assert [d["completion"] for d in lines] == [r["prediction"] for r in rows]


def _error(*args: str) -> str:
    """The one line kft.predict writes for a user's mistake (exit status 2, no traceback)."""
    status, _, err = _predict(*args)
    assert status == 2 and "Traceback" not in err, err[-3000:]
    [line] = err.strip().splitlines()
    return line


@pytest.mark.slow
def test_a_folder_that_is_not_a_saved_model_is_named(tmp_path):
    line = _error(f"--model={tmp_path}", "hello")
    assert line.startswith(f"error: {tmp_path}: no saved_model.pb")


@pytest.mark.slow
def test_an_empty_or_misshapen_input_file_is_named_with_its_line(decoder_run, tmp_path):
    path, _ = decoder_run
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    line = _error(f"--model={path}", f"--input_file={empty}")
    assert line == f"error: --input_file={empty}: the file holds no texts"
    misshapen = fx.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}, {"text": "hello"}])
    line = _error(f"--model={path}", f"--input_file={misshapen}")
    assert line == f"error: {misshapen}:2: no string field prompt"


@pytest.mark.slow
def test_raw_is_refused_for_a_classification_export(classifier):
    line = _error(f"--model={classifier}", "--raw", "a moving film")
    assert line == (f"error: --raw: {classifier} is not a decoder export (--task=causal_lm), so it has no "
                    "generate_raw signature")
