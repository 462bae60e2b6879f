"""Token ids are computed once per text, cached under the model folder, and never read stale."""

import logging
import os

import keras_hub
import numpy as np
import pytest

from conftest import sample_vocabulary, tiny_config
from kft.models import backbones
from kft.data import inputs
from kft.data import token_cache
from kft.training import trainer

TEXTS = ["a fine film", "dull", "the plot is thin but the acting is strong", "fine"]


@pytest.fixture()
def counted(monkeypatch):
    """Counts the texts that reach the tokenizer."""
    seen = []
    real = inputs._graph_tokenizer

    def counting(tokenizer):
        tokenize = real(tokenizer)

        def call(texts):
            seen.append(int(texts.shape[0]))
            return tokenize(texts)

        return call

    monkeypatch.setattr(inputs, "_graph_tokenizer", counting)
    return seen


def test_a_run_tokenizes_each_text_once_and_a_rerun_reads_the_cache(tiny_preset, tmp_path, counted):
    # drift=False: the drift probe tokenizes kft's general-text sample, not the data counted here
    config = tiny_config(backbone=tiny_preset, epochs=3, drift=False)
    first = trainer.train_and_evaluate(config, str(tmp_path / "a"))
    examples = first["data"]["train"]["examples"] + first["data"]["eval"]["examples"]
    assert sum(counted) == examples  # 3 epochs, and choosing sequence_length, tokenize nothing more
    assert {first["data"][k]["token_cache"] for k in ("train", "eval")} == {"miss"}
    assert os.listdir(tmp_path / "a" / "token_cache")

    counted.clear()
    config_b = tiny_config(backbone=tiny_preset, epochs=3, seed=4, drift=False)
    other = str(tmp_path / "b")
    os.makedirs(other)
    os.symlink(tmp_path / "a" / "token_cache", os.path.join(other, "token_cache"))
    second = trainer.train_and_evaluate(config_b, other)
    assert sum(counted) == 0
    assert {second["data"][k]["token_cache"] for k in ("train", "eval")} == {"hit"}
    for k in ("truncated", "mean_tokens", "max_tokens"):
        assert second["data"]["train"][k] == first["data"]["train"][k]
    assert second["sequence_length"] == first["sequence_length"]


def test_cached_ids_equal_fresh_ids_and_other_texts_or_tokenizers_miss(tiny_preset, tmp_path, counted):
    loaded = backbones.load(tiny_preset)
    cache = str(tmp_path / "cache")
    fresh, hit = token_cache.word_pieces(loaded.tokenizer, TEXTS, cache)
    again, hit_again = token_cache.word_pieces(loaded.tokenizer, TEXTS, cache)
    assert (hit, hit_again) == (False, True)
    assert again.to_list() == fresh.to_list() == inputs.word_pieces(loaded.tokenizer, TEXTS).to_list()

    counted.clear()
    _, hit = token_cache.word_pieces(loaded.tokenizer, TEXTS[:-1] + ["fine!"], cache)
    assert not hit and sum(counted) == len(TEXTS)
    cased = keras_hub.models.BertTokenizer(vocabulary=sample_vocabulary(), lowercase=False)
    assert token_cache.tokenizer_fingerprint(cased) != token_cache.tokenizer_fingerprint(loaded.tokenizer)
    _, hit = token_cache.word_pieces(cased, TEXTS, cache)
    assert not hit


@pytest.mark.parametrize("damage", [b"garbage", b""])
def test_a_damaged_cache_entry_is_reported_and_the_texts_tokenized_again(tiny_preset, tmp_path, caplog,
                                                                         damage):
    loaded = backbones.load(tiny_preset)
    cache = str(tmp_path / "cache")
    fresh, _ = token_cache.word_pieces(loaded.tokenizer, TEXTS, cache)
    (entry,) = os.listdir(cache)
    with open(os.path.join(cache, entry), "wb") as f:
        f.write(damage)
    with caplog.at_level(logging.WARNING):
        again, hit = token_cache.word_pieces(loaded.tokenizer, TEXTS, cache)
    assert not hit and again.to_list() == fresh.to_list()
    assert entry in caplog.text and "tokenizing again" in caplog.text
    np.testing.assert_array_equal(token_cache.word_pieces(loaded.tokenizer, TEXTS, cache)[0].flat_values,
                                  fresh.flat_values)
