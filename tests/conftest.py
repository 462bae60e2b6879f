"""Shared fixtures: tiny randomly initialised backbones saved in the formats kft loads.

`tiny_preset` is a keras-hub preset folder (written by save_to_preset); `tiny_hf_folder` is a
Hugging Face-format BERT folder (config.json + model.safetensors + vocab.txt). Both go through the
same `kft.models.backbones.load` path as a real checkpoint.
"""

from __future__ import annotations

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
                warmup_ratio=0.0, export=False, seed=3)
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
