"""Flags and flagfiles: every recipe parses, bad flags and bad data fail loudly and clearly."""

import glob
import os

import pytest
from absl import flags

from conftest import ROOT, run_python
from kft import config as config_lib

FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "**", "*.cfg"), recursive=True))


def fresh_flags(bench: bool = False):
    fv = flags.FlagValues()
    if bench:
        from kft import bench as bench_cli

        bench_cli.define_flags(fv)
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
    fv = fresh_flags(bench=os.path.basename(path).startswith("bench"))
    fv(["prog", f"--flagfile={path}"])
    config = config_lib.from_flags(fv)
    assert config.dataset or config.train_file


def test_required_flagfiles_exist():
    names = {os.path.basename(p) for p in FLAGFILES}
    assert {"demo.cfg", "imdb_reviews.cfg", "sst2.cfg"} <= names


def test_train_cli_reports_bad_data_without_a_traceback(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tlabel\ngood\t1\n\t0\n")
    proc = run_python(["-m", "kft.train", f"--train_file={bad}", f"--model_dir={tmp_path / 'm'}"])
    assert proc.returncode == 2
    assert f"error: {bad}:3: field 'sentence' is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_help_lists_the_kft_flags():
    proc = run_python(["-m", "kft.train", "--help"])  # absl exits 1 after printing help
    for name in ("--backbone", "--freeze_layers", "--learning_rate", "--strategy", "--train_file"):
        assert name in proc.stdout


def test_train_cli_rejects_positional_arguments(tmp_path):
    proc = run_python(["-m", "kft.train", "imdb_reviews"])
    assert proc.returncode != 0 and "every option is a --flag" in proc.stderr


def test_train_cli_reports_contradictory_flags_without_a_traceback(tmp_path):
    proc = run_python(["-m", "kft.train", "--dataset=sample_reviews", "--method=freeze",
                       "--freeze_layers=9", f"--model_dir={tmp_path / 'm'}", "--noexport"])
    assert proc.returncode == 2
    assert "error: --freeze_layers=9 but the backbone has 6 transformer layers" in proc.stderr
    assert "Traceback" not in proc.stderr
