"""Encoder–decoders (--task=seq2seq) on a tiny random BART Hugging Face folder written by
tests/seq2seq_fixtures.py: loading, target-only loss and training, the tuning methods, data errors,
refused flags, and the generating export served from a fresh process that imports only tensorflow
and tensorflow_text."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import decoder_fixtures as fx
import seq2seq_fixtures as sfx

SERVE = r"""
import json, sys
import tensorflow as tf, tensorflow_text  # noqa: F401
path, prompts = sys.argv[1], json.loads(sys.argv[2])
model = tf.saved_model.load(path)
out = {}
def run(name, values, signature="serving_default"):
    result = model.signatures[signature](prompt=tf.constant(values, tf.string))
    out[name] = {k: [x.decode("utf-8") if isinstance(x, bytes) else x for x in v.numpy().tolist()]
                 for k, v in result.items()}
run("batch", prompts)
run("one", prompts[:1])
run("empty_batch", [])
run("empty_prompt", [""])
run("long", [" ".join(["paris is the capital of france ."] * 40)])
run("raw", ["summarize : " + prompts[0]], "generate_raw")
out["modules"] = sorted(sys.modules.keys() & {"keras_hub", "kft"})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory) -> str:
    return sfx.write_bart_folder(str(tmp_path_factory.mktemp("tiny_bart")))


def _pairs(n: int, seed: int) -> list[dict]:
    """A learnable task: the summary is the dialogue's first two words."""
    rng = np.random.default_rng(seed)
    words = fx.TEXT.split()
    out = []
    for _ in range(n):
        dialogue = " ".join(rng.choice(words, rng.integers(3, 10)))
        out.append({"dialogue": dialogue, "summary": " ".join(dialogue.split()[:2])})
    return out


def _config(**overrides):
    from kft.config import Config

    base = dict(task="seq2seq", epochs=1, batch_size=4, learning_rate=3e-3, warmup_ratio=0.0, export=False,
                seed=3, max_new_tokens=6, checkpoint_every_steps=0, prompt_template="summarize : {dialogue}",
                completion_field="summary", drift=False)
    base.update(overrides)
    return Config(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2s_data")
    return (fx.write_jsonl(tmp / "train.jsonl", _pairs(32, 0)), fx.write_jsonl(tmp / "eval.jsonl", _pairs(10, 1)))


@pytest.fixture(scope="module")
def trained(bart_folder, data, tmp_path_factory):
    """Full fine-tuning for 3 epochs, exported: (fitted run, model_dir)."""
    from kft.training import trainer

    tmp = tmp_path_factory.mktemp("s2s_run")
    config = _config(backbone=bart_folder, train_file=data[0], eval_file=data[1], epochs=3, learning_rate=1e-2,
                     export=True, export_dir=str(tmp / "x"), model_dir=str(tmp / "m"), run_name="tiny_s2s",
                     drift=True)  # one test reads how far training moved the weights
    return trainer.fit_model(config, str(tmp / "m")), str(tmp / "m")


def test_the_hugging_face_bart_folder_loads_through_kft(bart_folder):
    from kft.tasks.seq2seq import backbone as backbone_lib

    from kft.models import backbones

    loaded = backbone_lib.load(bart_folder)
    assert type(loaded.backbone).__name__ == "BartBackbone" and loaded.kind == "hf_folder"
    # every tensor of the file is used (the positions' 2 offset rows are dropped by the converter)
    assert backbones.check_weights(loaded, bart_folder) == {"unused_tensors": [], "unmatched_weights": []}
    framing = (loaded.encoder_start, loaded.encoder_end, loaded.decoder_prefix, loaded.pad_id)
    assert framing == ([0], [2], [2, 0], 1)
    assert loaded.num_layers == 4  # 2 encoder + 2 decoder blocks
    tokens, _ = sfx.bart_vocabulary()
    np.testing.assert_array_equal(loaded.backbone.token_embedding.embeddings.numpy(),
                                  sfx.bart_weights(len(tokens), **sfx.BART)["shared.weight"])


def test_labels_cover_the_target_and_end_token_only(bart_folder):
    from kft.tasks.seq2seq import inputs as s2s_inputs
    from kft.tasks.seq2seq import backbone as backbone_lib

    loaded = backbone_lib.load(bart_folder, load_weights=False)
    enc = s2s_inputs.Encoded([np.array([0, 50, 2], np.int32)], [np.array([2, 0, 70, 71, 2], np.int32)],
                             ["x"], 0, 0, "off")
    ids, lengths, decoder, decoder_lengths, labels, sizes = s2s_inputs.matrices(enc, 1, 2)
    assert labels.tolist() == [[-1, 70, 71, 2, -1]] and sizes.tolist() == [3]
    framed, cut = s2s_inputs.frame_source(np.arange(10, 30, dtype=np.int32), loaded, 8)
    assert cut and framed.tolist() == [0, 10, 11, 12, 13, 14, 15, 2]  # cut at its end


def test_cached_generation_picks_what_the_training_graph_picks(bart_folder):
    """model.generate (keras-hub's encoder call and decoder KV cache in a while loop) against the
    backbone's full teacher-forced pass: each generated token is the argmax after the ones before."""
    import tensorflow as tf

    from kft.tasks.seq2seq import backbone as backbone_lib, model as s2s_model

    loaded = backbone_lib.load(bart_folder)
    lm = loaded.seq2seq_lm_class(backbone=loaded.backbone, preprocessor=None)
    ids = np.array([[0, 50, 60, 70, 2], [0, 80, 2, 1, 1]], np.int32)
    mask = (ids != 1).astype(np.int32)
    # stop at a token the random model does not favour, so that every row runs to the cap
    generated, stopped = s2s_model.generate(lm, tf.constant(ids), tf.constant(mask), loaded.decoder_prefix, 5,
                                            [3], loaded.pad_id)
    logits = s2s_model.logits_function(loaded.backbone)
    for row, tokens in enumerate(generated.to_list()):
        assert len(tokens) == 5 and not stopped.numpy()[row]
        decoder = np.array([loaded.decoder_prefix + tokens], np.int32)
        hidden = loaded.backbone({"encoder_token_ids": ids[row:row + 1], "encoder_padding_mask": mask[row:row + 1],
                                  "decoder_token_ids": decoder,
                                  "decoder_padding_mask": np.ones_like(decoder)})["decoder_sequence_output"]
        picked = np.argmax(np.asarray(logits(hidden))[0], axis=-1)
        assert picked[len(loaded.decoder_prefix) - 1:-1].tolist() == tokens


def test_the_served_input_sits_in_the_training_source_text():
    from kft.config import Config
    from kft.tasks.causal_lm import data as data_lib
    from kft.tasks.seq2seq import serving

    config = Config(task="seq2seq", prompt_template="summarize : {dialogue}\\n", completion_field="summary")
    split = data_lib.Examples("train", "t.jsonl", [data_lib.parse({"dialogue": "hi", "summary": "x"}, "template",
                                                               "t.jsonl:1", config)], "template")
    assert serving.source_affixes(config, split)[:2] == ("summarize : ", "\n")
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "x"}]}
    config = Config(task="seq2seq")
    split = data_lib.Examples("train", "t.jsonl", [data_lib.parse(chat, "messages", "t.jsonl:1", config)], "messages")
    assert serving.source_affixes(config, split)[:2] == ("Be brief.\n\n", "")


def test_batches_carry_the_decoder_sequence_cut_to_its_own_width():
    from kft.data import inputs

    lengths = np.array([3, 5, 2])
    matrix = np.arange(15, dtype=np.int32).reshape(3, 5)
    decoder = np.array([[7, 8, 9, 0], [7, 8, 0, 0], [7, 8, 9, 6]], np.int32)
    labels = np.where(decoder > 0, decoder, -1)
    plan = inputs.BatchPlan(np.array([[0, 1], [2, -1]], np.int32), np.array([5, 2], np.int32))
    batches = list(inputs.plan_dataset(plan, matrix, lengths, labels, np.ones(3, np.float32),
                                       sizes=np.array([3, 2, 4]), decoder=(decoder, np.array([3, 2, 4]))))
    features, batch_labels, weights = batches[0]
    assert features["token_ids"].shape == (2, 5) and features["decoder_token_ids"].numpy().tolist() == [[7, 8, 9],
                                                                                                      [7, 8, 0]]
    assert features["decoder_padding_mask"].numpy().tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch_labels.shape == (2, 3)  # the decoder's width, not the encoder's
    np.testing.assert_allclose(weights.numpy(), [1 / 5, 1 / 5])  # per trained token of the batch
    features, batch_labels, _ = batches[1]
    assert features["decoder_token_ids"].shape == (2, 4) and features["decoder_padding_mask"].numpy()[1].sum() == 0


def test_training_lowers_the_eval_loss_and_writes_scored_predictions(trained, bart_folder, data, tmp_path):
    from kft.training import trainer

    fitted, model_dir = trained
    history = fitted.metrics["training"]["history"]
    zero = trainer.fit_model(_config(backbone=bart_folder, train_file=data[0], eval_file=data[1], epochs=0,
                                     max_new_tokens=0, drift=False), str(tmp_path / "zero"))
    assert history[-1]["val_loss"] < history[0]["val_loss"] < zero.metrics["eval"]["loss"]
    report = fitted.metrics["eval"]
    assert {"rougeL", "bleu", "exact_match", "perplexity"} <= set(report)
    with open(os.path.join(model_dir, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 10 and rows[0]["prompt"].startswith("summarize : ")
    assert rows[0]["input"] == _pairs(10, 1)[0]["dialogue"]
    assert fitted.metrics["data"]["train"]["trained_tokens"] > 0
    assert fitted.metrics["drift"]["weights"]["overall"] > 0


@pytest.mark.slow
def test_the_export_served_in_a_fresh_process_generates_the_in_memory_predictions(trained):
    fitted, model_dir = trained
    with open(os.path.join(model_dir, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    proc = subprocess.run([sys.executable, "-c", SERVE, fitted.metrics["export"],
                           json.dumps([r["input"] for r in rows])], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] == []
    assert any(r["prediction"] for r in rows)  # the comparison is not one of empty texts
    assert out["batch"]["completion"] == [r["prediction"] for r in rows]
    assert out["batch"]["stopped"] == [r["stopped"] for r in rows]
    assert out["one"]["completion"] == out["batch"]["completion"][:1]
    assert out["raw"]["completion"] == out["batch"]["completion"][:1]
    assert out["empty_batch"] == {"completion": [], "completion_tokens": [], "stopped": [],
                                  "prompt_tokens_cut": []}
    assert len(out["empty_prompt"]["completion"]) == 1
    assert out["long"]["prompt_tokens_cut"][0] > 0
    assert all(n <= 6 for n in out["batch"]["completion_tokens"])


def test_lora_adapts_both_stacks_and_cross_attention_keeps_base_weights_and_merges(bart_folder, data,
                                                                                     tmp_path):
    from kft.models import backbones
    from kft.training import trainer
    from kft.methods import lora
    from kft.methods.lora import LoRAProjection
    from kft.tasks.seq2seq import backbone as backbone_lib

    config = _config(backbone=bart_folder, train_file=data[0], eval_file=data[1], method="lora",
                     lora_targets=["query", "value"], max_new_tokens=0, drift=False, learning_rate=1e-2)
    fitted = trainer.fit_model(config, str(tmp_path / "m"))
    # 4 blocks x (query, value), and the 2 decoder blocks' cross-attention query and value
    assert fitted.metrics["method"]["adapted_layers"] == 12
    assert all("lora" in w.path for w in fitted.model.trainable_weights)
    fresh = backbone_lib.load(bart_folder).backbone
    trained_blocks = backbones.transformer_layers(fitted.model.layers[-1])
    for block, start in zip(trained_blocks, backbones.transformer_layers(fresh)):
        wrapper = block._self_attention_layer._query_dense
        assert isinstance(wrapper, LoRAProjection)
        np.testing.assert_array_equal(wrapper.base.kernel.numpy(),
                                      start._self_attention_layer._query_dense.kernel.numpy())
        assert np.abs(wrapper.lora_b.numpy()).sum() > 0
    assert isinstance(trained_blocks[-1]._cross_attention_layer._value_dense, LoRAProjection)
    # merged for the export: the same function without the wrappers
    ids = {"token_ids": np.array([[0, 50, 60, 2]]), "padding_mask": np.ones((1, 4), np.int32),
           "decoder_token_ids": np.array([[2, 0, 70]]), "decoder_padding_mask": np.ones((1, 3), np.int32)}
    before = np.asarray(fitted.model(ids))
    assert lora.merge(fitted.model.layers[-1]) == 12
    np.testing.assert_allclose(np.asarray(fitted.model(ids)), before, atol=1e-5)
    assert not any(isinstance(layer, LoRAProjection) for layer in fitted.model._flatten_layers())


def test_freeze_keeps_the_embeddings_and_lowest_blocks(bart_folder, data, tmp_path):
    from kft.models import backbones
    from kft.training import trainer
    from kft.config import FlagError
    from kft.tasks.seq2seq import backbone as backbone_lib

    config = _config(backbone=bart_folder, train_file=data[0], eval_file=data[1], method="freeze",
                     freeze_layers=2, max_new_tokens=0, drift=False)
    fitted = trainer.fit_model(config, str(tmp_path / "m"))
    fresh = backbone_lib.load(bart_folder).backbone
    backbone = fitted.model.layers[-1]
    np.testing.assert_array_equal(backbone.token_embedding.embeddings.numpy(),
                                  fresh.token_embedding.embeddings.numpy())
    now, start = backbones.transformer_layers(backbone), backbones.transformer_layers(fresh)
    for i in (0, 1):  # the encoder's blocks
        for a, b in zip(now[i].weights, start[i].weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(now[3].weights, start[3].weights))
    with pytest.raises(FlagError, match="freezes every weight"):
        trainer.fit_model(_config(backbone=bart_folder, train_file=data[0], method="freeze", freeze_layers=-1,
                                  epochs=0), str(tmp_path / "m2"))


def test_data_errors_name_the_file_line_and_field(bart_folder, tmp_path):
    from kft.training import trainer
    from kft.config import FlagError
    from kft.data.sources import DataError

    good = _pairs(4, 0)
    bad = fx.write_jsonl(tmp_path / "bad.jsonl", good[:2] + [{"dialogue": "hello"}] + good[2:])
    with pytest.raises(DataError, match=r"bad.jsonl:3: missing field 'summary' \(--completion_field\)"):
        trainer.fit_model(_config(backbone=bart_folder, train_file=bad), str(tmp_path / "m"))
    chats = fx.write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="chats.jsonl:2: the last turn of 'messages' is 'user'"):
        trainer.fit_model(_config(backbone=bart_folder, train_file=chats, prompt_template=""), str(tmp_path / "m"))
    text = fx.write_jsonl(tmp_path / "text.jsonl", [{"sentence": "the cat sat"}] * 4)
    with pytest.raises(FlagError, match="plain text .* --task=seq2seq trains on source/target pairs"):
        trainer.fit_model(_config(backbone=bart_folder, train_file=text, prompt_template=""), str(tmp_path / "m"))


def test_flags_of_other_tasks_and_other_methods_are_refused(bart_folder, data, tmp_path):
    from kft.training import trainer
    from kft.config import FlagError

    for flag, match in (({"chat_template": "none"}, "--chat_template=none applies to --task=causal_lm"),
                        ({"pooling": "cls"}, "--pooling=cls applies to --task=classification"),
                        ({"quantize": "int8"}, "--quantize=int8 applies to"),
                        ({"method": "prompt"}, "--method=prompt is not available for --task=seq2seq")):
        with pytest.raises(FlagError, match=match):
            trainer.fit_model(_config(backbone=bart_folder, train_file=data[0], epochs=0, **flag),
                              str(tmp_path / "m"))
    from kft.models.backbones import BackboneError

    with pytest.raises(BackboneError, match="--task=seq2seq has no bundled model"):
        trainer.fit_model(_config(train_file=data[0]), str(tmp_path / "m"))
    with pytest.raises(FlagError, match="--max_new_tokens=9 applies to --task=causal_lm or --task=seq2seq"):
        trainer.fit_model(_config(task="classification", prompt_template="", completion_field="completion",
                                  max_new_tokens=9), str(tmp_path / "m"))
