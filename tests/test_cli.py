"""Flags and flagfiles: every recipe parses, bad flags and bad data fail loudly and clearly."""

import glob
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from conftest import ROOT, run_python
from kft import config as config_lib

FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "**", "*.cfg"), recursive=True))


def fresh_flags(bench: bool = False, tune: bool = False):
    fv = flags.FlagValues()
    if bench:
        from kft import bench as bench_cli

        bench_cli.define_flags(fv)
    elif tune:
        from kft import tune as tune_cli

        tune_cli.define_flags(fv)
    else:
        config_lib.define_flags(fv)
    return fv


def test_every_config_field_is_a_flag_with_default_and_help():
    fv = fresh_flags()
    for field in config_lib.fields():
        assert fv[field.name].default == config_lib.default(field)
        assert fv[field.name].help.strip()
    assert config_lib.from_flags(fv) == config_lib.Config()


def test_mistyped_flag_fails_loudly():
    with pytest.raises(flags.UnrecognizedFlagError):
        fresh_flags()(["prog", "--learnig_rate=1e-4"])
    with pytest.raises(flags.IllegalFlagValueError):
        fresh_flags()(["prog", "--strategy=gpu_magic"])


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfiles_parse_and_document_themselves(path):
    header = [line for line in open(path) if line.startswith("#")]
    text = "".join(header)
    for key in ("Command:", "Data:", "Result:"):
        assert key in text, f"{path}: header lacks '{key}'"
    assert "PLACEHOLDER" not in text
    fv = fresh_flags(bench=os.path.basename(path).startswith("bench"),
                     tune=os.path.basename(os.path.dirname(path)) == "tune")
    fv(["prog", f"--flagfile={path}"])
    config = config_lib.from_flags(fv)
    assert config.dataset or config.train_file


def test_required_flagfiles_exist():
    names = {os.path.basename(p) for p in FLAGFILES}
    assert {"demo.cfg", "imdb_reviews.cfg", "sst2.cfg"} <= names


def test_an_unmarked_test_that_starts_a_subprocess_fails_and_says_to_mark_it_slow():
    """tests/conftest.py keeps the fast tier (-m "not slow") in one interpreter."""
    with pytest.raises(pytest.fail.Exception, match=r"starts a subprocess .*without @pytest.mark.slow"):
        run_python(["-c", "pass"])
    with pytest.raises(pytest.fail.Exception, match=r"starts a subprocess .*without @pytest.mark.slow"):
        subprocess.Popen([sys.executable, "-c", "pass"])
    with pytest.raises(pytest.fail.Exception, match=r"os.system"):
        os.system("true")


@pytest.mark.slow
def test_train_cli_reports_bad_data_without_a_traceback(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tlabel\ngood\t1\n\t0\n")
    proc = run_python(["-m", "kft.train", f"--train_file={bad}", f"--model_dir={tmp_path / 'm'}"])
    assert proc.returncode == 2
    assert f"error: {bad}:3: field 'sentence' is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_help_lists_the_kft_flags():
    proc = run_python(["-m", "kft.train", "--help"])  # absl exits 1 after printing help
    for name in ("--backbone", "--freeze_layers", "--learning_rate", "--strategy", "--train_file"):
        assert name in proc.stdout


@pytest.mark.slow
def test_train_cli_rejects_positional_arguments(tmp_path):
    proc = run_python(["-m", "kft.train", "imdb_reviews"])
    assert proc.returncode != 0 and "every option is a --flag" in proc.stderr


@pytest.mark.slow
def test_train_cli_reports_contradictory_flags_without_a_traceback(tmp_path):
    proc = run_python(["-m", "kft.train", "--dataset=sample_reviews", "--method=freeze",
                       "--freeze_layers=9", f"--model_dir={tmp_path / 'm'}", "--noexport"])
    assert proc.returncode == 2
    assert "error: --freeze_layers=9 but the backbone has 6 transformer layers" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_cli_on_a_two_row_csv_says_why_instead_of_a_traceback(tmp_path):
    train = tmp_path / "t.csv"
    train.write_text("text,stars\ngreat film,5\nawful film,1\n")
    proc = run_python(["-m", "kft.train", f"--train_file={train}", "--text_field=text", "--label_field=stars",
                       f"--model_dir={tmp_path / 'm'}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"error: {train}: 2 rows in 2 classes (1: 1, 5: 1); --validation_fraction=0.1 holds out no row "
            "for evaluation") in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def tiny_run(tiny_preset, tmp_path_factory):
    """A four-step `kft.train` run as a user starts it: TF_CPP_MIN_LOG_LEVEL not set."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    model_dir = tmp_path_factory.mktemp("tiny_run") / "m"
    proc = subprocess.run(
        [sys.executable, "-m", "kft.train", "--dataset=sample_reviews", f"--backbone={tiny_preset}",
         "--max_train_examples=64", "--num_buckets=1", "--batch_size=16", "--epochs=1", "--log_every_steps=1",
         "--noexport", "--nodrift", f"--model_dir={model_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_tensorflow_start_up_chatter_stays_out_and_kft_names_the_devices_once(tiny_run):
    lines = (tiny_run.stderr + tiny_run.stdout).splitlines()
    noise = [line for line in lines if line.startswith("E0000") or "cuInit" in line
             or "absl::InitializeLog" in line or "oneDNN custom operations" in line
             or "cudart_stub" in line]
    assert noise == []
    devices = [line for line in lines if "] devices: " in line]
    assert len(devices) == 1 and "CPU" in devices[0] and "; strategy: " in devices[0], devices


@pytest.mark.slow
def test_a_short_runs_log_has_throughput_and_eta_and_times_its_evaluation(tiny_run):
    steps = re.findall(r"\] (step \d+/4 \(epoch 1/1\): loss [\d.]+, .*)", tiny_run.stderr)
    assert len(steps) == 4, tiny_run.stderr[-3000:]
    for line in steps:
        assert re.fullmatch(r"step \d/4 \(epoch 1/1\): loss \d\.\d{4}, [\d.,]+ steps/s, [\d.,]+ examples/s, "
                            r"[\d.,]+ tokens/s, elapsed [\dhm.]+s, eta [\dhm.]+s", line), line
    assert re.search(r"epoch 1/1: evaluating 60 eval examples \.\.\.", tiny_run.stderr)
    assert re.search(r"epoch 1/1 done at step 4: .* \(evaluated in [\d.]+s\)", tiny_run.stderr)
    assert re.search(r"learning rate 5e-5 \(default for --method=full\)", tiny_run.stderr)
