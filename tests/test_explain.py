"""Integrated-gradient attributions: complete, blind to what the model cannot see, drawn for people."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import run_python, tiny_config
from kft import attribution_report, attributions, runs, trainer

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
    records = attribution_report.explain(run, TEXTS, steps=64)
    assert [r["text"] for r in records] == TEXTS
    for r in records:
        assert r["completeness_error"] <= 0.01, r
        assert abs(r["f_input"] - r["f_baseline"]) > 0.02  # a real change to explain, not 0 = 0
        assert sum(w["attribution"] for w in r["words"]) == pytest.approx(r["attribution_sum"], abs=1e-6)
        assert [w["word"] for w in r["words"]] == r["text"].split()
        assert r["explained"] == r["predicted"] and 0.5 <= r["probability"] <= 1.0


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


def test_the_page_the_image_and_the_json_lines_hold_every_word(trained_run, tmp_path):
    out = tmp_path / "explain"
    proc = run_python(["-m", "kft.explain", f"--model_dir={trained_run}", f"--output_dir={out}", *TEXTS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
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


def test_explain_refuses_what_it_cannot_explain_in_one_line(trained_run, tmp_path):
    proc = run_python(["-m", "kft.explain", f"--model_dir={tmp_path}", "text"])
    assert proc.returncode == 2 and "no metrics.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_python(["-m", "kft.explain", f"--model_dir={trained_run}", "--target=neutral", "text"])
    assert proc.returncode == 2 and "--target=neutral" in proc.stderr and "Traceback" not in proc.stderr


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on this machine (Debian: apt-get "
                                                 "install chromium); the page is checked as text above")
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
