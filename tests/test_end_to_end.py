"""The bundled MiniLM fine-tuned for real: the quickstart recipe and a slice of SST-2."""

import json
import os

import pytest

from conftest import SHARED_DATA, run_python
from kft.training import trainer
from kft.config import Config

SST2 = os.path.abspath(os.path.join(SHARED_DATA, "sst2"))
needs_sst2 = pytest.mark.skipif(not os.path.isfile(os.path.join(SST2, "dev.tsv")),
                                reason=f"SST-2 files not present at {SST2}")
POSITIVE = "a gorgeous, witty, seductive movie."
NEGATIVE = "the plot is nothing but boilerplate clichés from start to finish"


@pytest.mark.slow
def test_demo_recipe_trains_exports_and_serves(tmp_path):
    proc = run_python(["-m", "kft.train", "--flagfile=flags/demo.cfg", f"--model_dir={tmp_path / 'm'}",
                       f"--export_dir={tmp_path / 'exports'}"], env={"KFT_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["export"] == str(tmp_path / "exports" / "demo" / "1")
    assert summary["eval"]["accuracy"] >= 0.85, summary


@needs_sst2
@pytest.mark.slow
def test_minilm_on_an_sst2_slice_reaches_a_real_accuracy_bar(tmp_path):
    config = Config(train_file=os.path.join(SST2, "train.tsv"), eval_file=os.path.join(SST2, "dev.tsv"),
                    label_names=["negative", "positive"], max_train_examples=3000, max_eval_examples=800,
                    epochs=1, batch_size=32, learning_rate=1e-4, export_dir=str(tmp_path / "exports"),
                    run_name="sst2_slice", drift=False)
    result = trainer.train_and_evaluate(config, str(tmp_path / "m"))
    assert result["eval"]["examples"] == 800
    assert result["eval"]["accuracy"] >= 0.80, result["eval"]  # measured 0.83; majority class 0.55
    assert result["eval"]["macro_f1"] >= 0.79
    proc = run_python(["-m", "kft.predict", f"--model={result['export']}", POSITIVE, NEGATIVE])
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = [json.loads(line)["label"] for line in proc.stdout.splitlines()]
    assert labels == ["positive", "negative"]
