"""Integrated-gradient attributions: complete, blind to what the model cannot see, drawn for people."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import run_python, tiny_config
from kft.analysis import attribution_report
from kft.analysis import attributions
from kft.training import runs
from kft.training import trainer
from kft.explain import DEFAULT_IG_STEPS

TEXTS = ["a lovely film with a big heart", "the plot is dull and far too long", "fine"]


@pytest.fixture(scope="module")
def trained_run(tiny_preset, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    # mean pooling: the tiny model's decision then depends on its words (with the pooler's [CLS]
    # vector it barely does, and a baseline of padding scores like the text)
    trainer.fit_model(tiny_config(backbone=tiny_preset, epochs=4, learning_rate=3e-3, pooling="mean"), path)
    return path


def test_attributions_sum_to_the_output_change_within_one_percent_at_the_default_steps(trained_run):
    run = runs.load_run(trained_run)
    records = attribution_report.explain(run, TEXTS, steps=DEFAULT_IG_STEPS)
    assert [r["text"] for r in records] == TEXTS
    for r in records:
        assert r["completeness_error"] <= 0.01, r
        assert abs(r["f_input"] - r["f_baseline"]) > 0.02  # a real change to explain, not 0 = 0
        assert sum(w["attribution"] for w in r["words"]) == pytest.approx(r["attribution_sum"], abs=1e-6)
        assert [w["word"] for w in r["words"]] == r["text"].split()
        assert r["explained"] == r["predicted"] and 0.5 <= r["probability"] <= 1.0


def test_a_text_above_the_gap_is_refined_until_it_is_within_one_percent(trained_run):
    run = runs.load_run(trained_run)
    [coarse] = attribution_report.explain(run, TEXTS[:1], steps=1)
    assert coarse["completeness_error"] > 0.01 and coarse["ig_steps"] == 1  # one interval: a real gap
    [refined] = attribution_report.explain(run, TEXTS[:1], steps=1, max_steps=1024)
    assert refined["completeness_error"] <= 0.01
    steps = refined["ig_steps"]
    assert 1 < steps <= 1024 and steps & (steps - 1) == 0  # doubled until within the gap
    # halving reuses the earlier points: the same attributions as computing those intervals at once
    [direct] = attribution_report.explain(run, TEXTS[:1], steps=steps)
    np.testing.assert_allclose([w["attribution"] for w in refined["words"]],
                               [w["attribution"] for w in direct["words"]], rtol=1e-4, atol=1e-6)
    assert refined["f_input"] == pytest.approx(direct["f_input"]) and direct["ig_steps"] == steps
    # a text already within the gap is not refined
    [fine] = attribution_report.explain(run, TEXTS[:1], steps=steps, max_steps=4 * steps)
    assert fine["ig_steps"] == steps


def test_a_target_label_is_explained_instead_of_the_prediction_and_its_sign_flips(trained_run):
    run = runs.load_run(trained_run)
    [predicted] = attribution_report.explain(run, TEXTS[:1], 64)
    other = next(n for n in run.names if n != predicted["predicted"])
    [against] = attribution_report.explain(run, TEXTS[:1], 64, target=other)
    assert against["explained"] == other
    # two classes: p(other) = 1 - p(predicted), so every word's attribution changes sign
    np.testing.assert_allclose([w["attribution"] for w in against["words"]],
                               [-w["attribution"] for w in predicted["words"]], atol=1e-5)


def test_a_word_the_model_cannot_see_gets_zero_attribution(trained_run):
    run = runs.load_run(trained_run)
    w = attributions.split_words("a lovely film with a big heart", run.loaded.tokenizer, run.loaded.packing, 32)
    mask = np.ones_like(w.token_ids)
    hidden = int(np.flatnonzero(w.piece_word == 1)[0])  # "lovely"
    mask[hidden] = 0  # attention never reads this position
    result = attributions.integrated_gradients(run.model, w.token_ids, mask, w.piece_word >= 0,
                                               lambda out: out[:, 1], run.loaded.packing.pad, 16)
    assert result.tokens[hidden] == 0.0
    assert np.abs(result.tokens[w.piece_word >= 0]).max() > 0
    assert np.all(result.tokens[w.piece_word < 0] == 0)  # special tokens are not interpolated


def _explain_cli(run_dir, out, texts) -> list[dict]:
    """Runs `kft.explain` in a fresh process; returns the JSON lines it printed."""
    proc = run_python(["-m", "kft.explain", f"--model_dir={run_dir}", f"--output_dir={out}", *texts])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_the_page_the_image_and_the_json_lines_hold_every_word(trained_run, tmp_path):
    out = tmp_path / "explain"
    lines = _explain_cli(trained_run, out, TEXTS)
    assert [r["text"] for r in lines] == TEXTS
    page = (out / "attributions.html").read_text()
    for text in TEXTS:
        for word in text.split():
            assert f">{word}</span>" in page
    records = [json.loads(line) for line in (out / "attributions.jsonl").read_text().splitlines()]
    assert len(records) == len(TEXTS) and all(r["completeness_error"] <= 0.01 for r in records)
    # each word's shade: red when it pushes toward the explained output, blue against, the text's
    # strongest word at full strength
    shades = re.findall(r'rgba\((\d+),(\d+),(\d+),([\d.]+)\)" title="([-+][\d.]+)">', page)
    assert len(shades) == sum(len(t.split()) for t in TEXTS)
    for red, green, blue, alpha, value in shades:
        assert (red, green, blue) == (("214", "39", "40") if float(value) >= 0 else ("31", "119", "180"))
    for record in records:
        assert max(abs(w["attribution"]) for w in record["words"]) > 0
    assert sum(float(alpha) == 0.85 for *_, alpha, _ in shades) >= len(TEXTS)
    assert (out / "attributions.png").stat().st_size > 5_000


@pytest.mark.slow
def test_explain_refuses_what_it_cannot_explain_in_one_line(trained_run, tmp_path):
    proc = run_python(["-m", "kft.explain", f"--model_dir={tmp_path}", "text"])
    assert proc.returncode == 2 and "no metrics.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_python(["-m", "kft.explain", f"--model_dir={trained_run}", "--target=neutral", "text"])
    assert proc.returncode == 2 and "--target=neutral" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_python(["-m", "kft.explain", f"--model_dir={trained_run}", "--ig_steps=64", "--ig_max_steps=32",
                       "text"])
    assert proc.returncode != 0 and "--ig_max_steps=32" in proc.stderr and "Traceback" not in proc.stderr


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on this machine (Debian: apt-get "
                                                 "install chromium); the page is checked as text above")
@pytest.mark.slow
def test_a_headless_browser_renders_the_words_in_their_colours(trained_run, tmp_path):
    from PIL import Image

    out = tmp_path / "explain"
    proc = run_python(["-m", "kft.explain", f"--model_dir={trained_run}", f"--output_dir={out}", TEXTS[0]])
    assert proc.returncode == 0, proc.stderr[-2000:]
    dump = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           f"file://{out / 'attributions.html'}"], capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    for word in TEXTS[0].split():
        assert f">{word}</span>" in dump.stdout  # the browser parsed every word into the page
    [record] = [json.loads(line) for line in (out / "attributions.jsonl").read_text().splitlines()]
    flat = dict(record, words=[dict(w, attribution=0.0) for w in record["words"]])
    (tmp_path / "flat.html").write_text(attribution_report.page([flat], "flat"))

    def colours(page):
        shot = tmp_path / f"{page.stem}.png"
        subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1000,400", f"file://{page}"], capture_output=True, timeout=120, check=True)
        pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
        red = (pixels[:, 0] > pixels[:, 2] + 60) & (pixels[:, 0] > pixels[:, 1] + 60)
        blue = pixels[:, 2] > pixels[:, 0] + 60
        return int(red.sum()), int(blue.sum())

    shaded, plain = colours(out / "attributions.html"), colours(tmp_path / "flat.html")
    strongest = max(record["words"], key=lambda w: abs(w["attribution"]))
    # the legend has both colours on both pages; the words add the colour of the strongest one
    index = 0 if strongest["attribution"] >= 0 else 1
    assert shaded[index] > plain[index] + 100, (shaded, plain, strongest)


# -- decoders (--task=causal_lm): the completion's log-probability toward the prompt's words ------------

DECODER_TEXTS = ["what is the capital of france ?", "the cat sat on the mat .", "hello , how are you ?"]


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    """A tiny random llama (ChatML template) fine-tuned for a few steps on random chats."""
    import decoder_fixtures as fx
    from kft.config import Config

    folder = fx.write_llama_folder(str(tmp_path_factory.mktemp("tiny_llama")))
    path = str(tmp_path_factory.mktemp("decoder_run"))
    rng = np.random.default_rng(0)
    words = fx.TEXT.split()
    train = os.path.join(path, "train.jsonl")
    with open(train, "w") as f:
        for _ in range(8):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": " ".join(rng.choice(words, rng.integers(3, 12)))},
                {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 5)))}]}) + "\n")
    config = Config(task="causal_lm", backbone=folder, train_file=train, validation_fraction=0.25, epochs=1,
                    batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, export=False, seed=3, max_new_tokens=4,
                    checkpoint_every_steps=0, drift=False)
    trainer.train_and_evaluate(config, path)
    return path


def _log_probs_without_attribution(run, prompt: str, completion: list[int]) -> np.ndarray:
    """The completion tokens' log-probabilities and the greedy choice at each, straight from the backbone."""
    import tensorflow as tf

    ids = np.asarray(list(np.asarray(run.loaded.tokenizer(prompt)).reshape(-1)) + completion, np.int32)[None]
    backbone = run.loaded.backbone
    logits = backbone.token_embedding(backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)}),
                                      reverse=True)
    start = ids.shape[1] - len(completion)
    log_probs = tf.nn.log_softmax(tf.cast(logits[0, start - 1:-1], tf.float32)).numpy()
    return log_probs[np.arange(len(completion)), completion], log_probs.argmax(-1)


def test_decoder_attributions_sum_to_the_change_of_the_completions_log_probability(decoder_run):
    run = runs.load_run(decoder_run)
    records = attribution_report.explain(run, DECODER_TEXTS, steps=DEFAULT_IG_STEPS)
    assert [r["text"] for r in records] == DECODER_TEXTS
    for r in records:
        assert r["completeness_error"] <= 0.01, r
        assert abs(r["f_input"] - r["f_baseline"]) > 0.02
        assert sum(w["attribution"] for w in r["words"]) == pytest.approx(r["attribution_sum"], abs=1e-6)
        assert [w["word"] for w in r["words"]] == r["text"].split()
        assert r["prompt"].endswith("<|im_start|>assistant\n") and r["text"] in r["prompt"]
        # f is the log-probability of the greedy completion given the prompt, computed here without
        # the scaled embeddings (the tied output projection must not be scaled with them)
        log_probs, greedy = _log_probs_without_attribution(run, r["prompt"], r["completion_ids"])
        assert greedy.tolist() == r["completion_ids"]
        assert len(r["completion_ids"]) == 4 if not r["stopped"] else 1 <= len(r["completion_ids"]) <= 5
        assert r["f_input"] == pytest.approx(float(log_probs.sum()), abs=1e-4)
        assert r["mean_token_probability"] == pytest.approx(float(np.exp(log_probs).mean()), rel=1e-4)
    [forced] = attribution_report.explain(run, DECODER_TEXTS[:1], 16, target=" paris")
    assert forced["explained"] == "target"
    assert forced["completion_ids"] == np.asarray(run.loaded.tokenizer(" paris")).reshape(-1).tolist()
    log_probs, _ = _log_probs_without_attribution(run, forced["prompt"], forced["completion_ids"])
    assert forced["f_input"] == pytest.approx(float(log_probs.sum()), abs=1e-4)


def test_a_prompt_word_the_decoder_cannot_see_gets_zero_attribution(decoder_run):
    from kft.tasks.causal_lm import explain as lm_explain

    run = runs.load_run(decoder_run)
    _, prompt_ids, piece_word, words, _, _ = lm_explain.prepare_prompt(run, DECODER_TEXTS[0], 4)
    completion = np.asarray(run.loaded.tokenizer(" paris is"), np.int32).reshape(-1)
    token_ids = np.concatenate([prompt_ids, completion[:-1]])
    content = np.concatenate([piece_word >= 0, np.zeros(len(completion) - 1, bool)])
    hidden = np.flatnonzero(piece_word == words.index("capital"))
    mask = np.ones_like(token_ids)
    mask[hidden] = 0  # no later position attends to it: the completion cannot depend on it
    result = lm_explain.attribute(run.model, token_ids, len(prompt_ids), completion, content,
                                  run.loaded.pad_id, 16, padding_mask=mask)
    assert len(hidden) and np.all(result.tokens[hidden] == 0.0)
    seen = content.copy()
    seen[hidden] = False
    assert np.abs(result.tokens[seen]).min() > 0
    # neither the templates' tokens nor the completion's are interpolated
    assert np.all(result.tokens[~content] == 0) and (~content[:len(prompt_ids)]).sum() > 10
    # words the run's --sequence_length cuts from the prompt's start are not read either: 0, and counted
    long = " ".join(["the cat sat on the mat ."] * 12) + " what is the capital of france ?"
    [r] = attribution_report.explain(run, [long], 64)
    assert r["truncated_pieces"] > 0 and r["words"][0]["attribution"] == 0.0
    assert r["words"][-1]["attribution"] != 0.0 and r["completeness_error"] <= 0.01


@pytest.mark.slow
def test_the_decoder_page_image_and_json_lines_hold_every_word_and_the_completion(decoder_run, tmp_path):
    import html

    out = tmp_path / "explain"
    lines = _explain_cli(decoder_run, out, DECODER_TEXTS)
    assert [r["text"] for r in lines] == DECODER_TEXTS
    records = [json.loads(line) for line in (out / "attributions.jsonl").read_text().splitlines()]
    assert len(records) == len(DECODER_TEXTS) and all(r["completeness_error"] <= 0.01 for r in records)
    page = (out / "attributions.html").read_text()
    for r in records:
        for word in r["text"].split():
            assert f">{html.escape(word)}</span>" in page
        assert r["completion_ids"] and f"&rarr; {html.escape(r['completion'])}</div>" in page
        assert f"mean token probability {r['mean_token_probability']:.3f}" in page
    assert (out / "attributions.png").stat().st_size > 5_000


def test_a_zero_shot_decoder_run_is_explained_with_the_pretrained_weights(tmp_path):
    """An --epochs=0 decoder run saves no checkpoint; its model is the untouched pretrained one."""
    import decoder_fixtures as fx

    from kft.models import backbones
    from kft.config import Config

    folder = fx.write_llama_folder(str(tmp_path / "tiny_llama"))
    train = os.path.join(tmp_path, "train.jsonl")
    with open(train, "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"what is the capital {i} ?", "completion": "paris"}) + "\n")
    path = str(tmp_path / "zero_shot")
    trainer.train_and_evaluate(Config(task="causal_lm", backbone=folder, train_file=train, validation_fraction=0.5,
                                      epochs=0, export=False, max_new_tokens=2, drift=False), path)
    run = runs.load_run(path)
    assert run.checkpoint == "the pretrained model (an --epochs=0 run)"
    pretrained = backbones.load_decoder(folder).backbone
    for a, b in zip(run.loaded.backbone.weights, pretrained.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_zero_shot_classification_run_is_refused_its_head_is_random(tiny_preset, tmp_path):
    from kft.config import FlagError

    path = str(tmp_path / "zero_shot")
    trainer.train_and_evaluate(tiny_config(backbone=tiny_preset, epochs=0), path)
    with pytest.raises(FlagError, match="an --epochs=0 run trained nothing"):
        runs.load_run(path)
