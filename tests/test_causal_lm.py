"""Decoder LLMs (--task=causal_lm): GGUF import, chat templates, completion-only loss, tuning methods,
generation, the whole run, data validation, and perplexity on general text (drift). Tiny random
llama/gpt2 models written by tests/decoder_fixtures.py; the bundled SmolLM2 only in the slow test at the end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import decoder_fixtures as fx
from conftest import SHARED_DATA


# llama_folder and gpt2_folder: the tiny decoders of tests/conftest.py (session-scoped, shared)


def _config(**overrides):
    from kft.config import Config

    base = dict(task="causal_lm", epochs=1, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0,
                export=False, seed=3, max_new_tokens=4, checkpoint_every_steps=0, drift=False)
    base.update(overrides)
    return Config(**base)


def _logits(loaded, ids):
    x = loaded.backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    return np.asarray(loaded.backbone.token_embedding(x, reverse=True))


# -- GGUF -----------------------------------------------------------------------------------------------

def test_permute_and_unpermute_are_inverse_and_not_identity():
    from kft.models.gguf_import import permute, unpermute

    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    assert not np.array_equal(permute(w, 2), w)
    np.testing.assert_array_equal(unpermute(permute(w, 2), 2), w)


def test_gguf_file_gives_the_same_logits_as_its_weights_written_directly(tmp_path):
    """F32 and Q8_0 tensors, llama.cpp's query/key row order: dequantised and un-permuted, the GGUF
    model computes exactly what a Hugging Face folder holding the same values computes."""
    from kft.models import backbones

    tokens, _ = fx.bpe_vocabulary()
    source = fx.llama_weights(len(tokens), **fx.LLAMA)
    expected = fx.write_llama_gguf(str(tmp_path / "tiny.gguf"), source)
    assert not np.array_equal(expected["model.layers.0.mlp.up_proj.weight"],
                              source["model.layers.0.mlp.up_proj.weight"])  # Q8_0 changed them a little
    direct = backbones.load_decoder(fx.write_llama_folder(str(tmp_path / "direct"), expected))
    from_gguf = backbones.load_decoder(str(tmp_path / "tiny.gguf"), str(tmp_path / "cache"))
    assert from_gguf.kind == "gguf" and from_gguf.chat_template == fx.CHATML
    assert from_gguf.eos_id == 2 and from_gguf.bos_id is None
    with open(os.path.join(from_gguf.source, "config.json")) as f:
        assert json.load(f)["rms_norm_eps"] == 1e-5
    assert from_gguf.backbone.layer_norm_epsilon == pytest.approx(1e-5)  # keras-hub's default is 1e-6
    ids = np.asarray([[1, 40, 70, 300, 5, 2, 120, 9]], np.int32)
    np.testing.assert_allclose(_logits(from_gguf, ids), _logits(direct, ids), atol=1e-5)
    text = "what is the capital of france ?"
    assert np.asarray(from_gguf.tokenizer(text)).tolist() == np.asarray(direct.tokenizer(text)).tolist()


def test_gguf_conversion_is_cached_by_content(tmp_path):
    from kft.models import gguf_import

    tokens, _ = fx.bpe_vocabulary()
    fx.write_llama_gguf(str(tmp_path / "a.gguf"), fx.llama_weights(len(tokens), **fx.LLAMA))
    first = gguf_import.convert(str(tmp_path / "a.gguf"), str(tmp_path / "cache"), log=lambda m: None)
    stamp = os.path.getmtime(os.path.join(first, "model.safetensors"))
    logged = []
    again = gguf_import.convert(str(tmp_path / "a.gguf"), str(tmp_path / "cache"), log=logged.append)
    assert again == first and not logged
    assert os.path.getmtime(os.path.join(first, "model.safetensors")) == stamp


def test_gguf_of_another_architecture_is_refused_by_name(tmp_path):
    import gguf

    from kft.models import gguf_import

    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf_import.GGUFError, match="general.architecture is 'mamba'"):
        gguf_import.convert(str(tmp_path / "x.gguf"), str(tmp_path / "cache"), log=lambda m: None)


# -- chat templates and token layout --------------------------------------------------------------------

def test_chat_template_renders_as_the_reference_rendering():
    from kft.tasks.causal_lm import chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert chat.render(fx.CHATML, messages, add_generation_prompt=True) == expected


def test_chat_template_renders_as_transformers_renders_it():
    from kft.tasks.causal_lm import chat

    # the reference renderer, where installed (kft.bench's extra): a visible skip where it is not
    pytest.importorskip("transformers", reason="the reference renderer needs transformers (pip install kft[bench])")
    from transformers.utils.chat_template_utils import render_jinja_template

    for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
                     [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "And 3+3?"}]):
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=fx.CHATML,
                                            add_generation_prompt=True)
        assert chat.render(fx.CHATML, messages, add_generation_prompt=True) == rendered[0]


def test_chat_template_errors_are_reported_not_raised_raw():
    from kft.tasks.causal_lm import chat

    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(chat.TemplateError, match="user first"):
        chat.render(template, [{"role": "assistant", "content": "x"}], True)


def test_loss_is_on_completion_tokens_and_eos_only(llama_folder, tmp_path):
    from kft.models import backbones
    from kft.tasks.causal_lm import data, inputs

    loaded = backbones.load_decoder(llama_folder)
    path = fx.write_jsonl(tmp_path / "t.jsonl", [{"prompt": "what is the capital", "completion": " paris"}])
    split = data.read_file(path, "train", _config(), "--train_file")
    enc = inputs.encode(split, loaded, loaded.chat_template, 64, False, None, None)
    ids, lengths, labels, sizes = inputs.matrices(enc, loaded.pad_id, train_on_prompt=False)
    completion = np.asarray(loaded.tokenizer(" paris")).tolist()
    start = int(enc.prompt_lengths[0])
    assert enc.prompt_texts[0].endswith("<|im_start|>assistant\n")
    assert ids[0, start:lengths[0]].tolist() == completion + [loaded.eos_id]
    trained = labels[0] >= 0
    assert trained.sum() == sizes[0] == len(completion) + 1  # EOS is a target
    assert not trained[:start - 1].any()  # prompt positions carry zero weight
    assert labels[0, start - 1:lengths[0] - 1].tolist() == completion + [loaded.eos_id]
    _, _, all_labels, all_sizes = inputs.matrices(enc, loaded.pad_id, train_on_prompt=True)
    assert all_sizes[0] == lengths[0] - 1


def test_long_prompts_are_cut_from_their_start_and_long_completions_counted(llama_folder, tmp_path):
    from kft.models import backbones
    from kft.tasks.causal_lm import data, inputs

    loaded = backbones.load_decoder(llama_folder)
    long = " ".join(["the cat sat on the mat ."] * 20)
    path = fx.write_jsonl(tmp_path / "t.jsonl", [{"prompt": long + " end", "completion": " paris"},
                                              {"prompt": "hello", "completion": long}])
    split = data.read_file(path, "train", _config(), "--train_file")
    enc = inputs.encode(split, loaded, None, 32, False, None, None)
    # the second prompt also gave way: its completion alone fills all but one position
    assert enc.prompts_cut == 2 and enc.completions_cut == 1
    assert len(enc.ids[1]) == 32 and enc.prompt_lengths[1] == 1
    assert all(len(x) <= 32 for x in enc.ids)
    end = np.asarray(loaded.tokenizer(" end")).tolist()
    first = enc.ids[0][:enc.prompt_lengths[0]].tolist()
    assert first[-len(end) - 1:-1] == end  # the prompt kept its end (then the "\n" separator)


@pytest.mark.parametrize("record,flags,message", [
    ({"prompt": "x"}, {}, "missing field 'completion'"),
    ({"prompt": "x", "completion": "  "}, {}, "field 'completion' is empty"),
    ({"dialogue": "x", "summary": "y"}, {"prompt_template": "{dialogue} {speaker}", "completion_field": "summary"},
     r"reads field\(s\) \['speaker'\]"),
    ({"messages": [{"role": "user", "content": "x"}]}, {}, "must be the assistant's answer"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, {},
     "role is 'narrator'"),
    ({"title": "x"}, {}, "neither a chat"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, flags, message):
    from kft.data.sources import DataError
    from kft.tasks.causal_lm import data

    path = fx.write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}
                                               if "prompt_template" not in flags and "messages" not in record
                                               and "title" not in record else record, record])
    line = 1 if ("prompt_template" in flags or "messages" in record or "title" in record) else 2
    with pytest.raises(DataError, match=message) as e:
        data.read_file(path, "train", _config(**flags), "--train_file")
    assert f"{path}:{line}" in str(e.value)


# -- methods, generation, whole runs --------------------------------------------------------------------

def _one_step(loaded, config):
    import keras
    import tensorflow as tf

    from kft import methods
    from kft.tasks.causal_lm import model as lm_model

    backbone, _ = methods.apply(loaded.backbone, config)
    model = lm_model.build_model(backbone)
    loss_fn = lm_model.loss_function(model)
    before = [v.numpy().copy() for v in model.weights]
    trainable = {id(v) for v in model.trainable_weights}
    ids = np.asarray([[1, 40, 70, 300, 5, 2, 120, 9]] * 2, np.int32)
    labels = np.where(np.arange(8) >= 4, np.roll(ids, -1, axis=1), -1).astype(np.int32)
    labels[:, -1] = -1
    optimizer = keras.optimizers.SGD(1e-1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(loss_fn(labels, model({"token_ids": ids, "padding_mask": np.ones_like(ids)})))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_weights), model.trainable_weights))
    changed = {id(v) for v, b in zip(model.weights, before) if not np.array_equal(v.numpy(), b)}
    return changed, trainable, model


@pytest.mark.parametrize("method,overrides", [
    ("lora", {"lora_targets": ["query", "key", "value", "attention_output", "gate", "up", "down"]}),
    ("freeze", {"freeze_layers": 1}),
    ("full", {}),
    ("prompt", {"num_prompt_tokens": 3}),
])
def test_one_step_changes_only_the_methods_variables(llama_folder, method, overrides):
    from kft.models import backbones

    loaded = backbones.load_decoder(llama_folder)
    changed, trainable, model = _one_step(loaded, _config(method=method, **overrides))
    assert changed and changed <= trainable
    if method == "lora":
        names = [v.path for v in model.weights if id(v) in changed]
        # B starts at zero, so the first step moves every B (and no A yet): 7 projections per block
        assert all(n.endswith("lora_b") for n in names) and len(names) == 7 * fx.LLAMA["layers"]


@pytest.mark.parametrize("folder,task,expected", [
    ("llama_folder", "causal_lm", ["query", "key", "value", "attention_output", "gate", "ffn_in", "ffn_out"]),
    ("gpt2_folder", "causal_lm", ["query", "key", "value", "attention_output", "ffn_in", "ffn_out"]),
])
def test_lora_on_a_decoder_adapts_every_linear_projection_by_default(folder, task, expected, request):
    """--lora_targets left at auto: a llama block's seven projections (a gpt2 block's six), and the
    description says they are the task's default; naming targets keeps exactly those."""
    from kft import methods
    from kft.models import backbones

    loaded = backbones.load_decoder(request.getfixturevalue(folder))
    config = _config(method="lora")
    assert config.lora_targets == ["auto"]
    backbone, info = methods.apply(loaded.backbone, config)
    assert info["targets"] == expected
    assert info["targets_source"].startswith("default for --task=causal_lm")
    blocks = len(backbones.transformer_layers(backbone))
    assert info["adapted_layers"] == blocks * len(expected)
    rank = config.lora_rank
    lora_params = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
    wrapped = [layer for layer in backbone._flatten_layers() if type(layer).__name__ == "LoRAProjection"]
    assert len(wrapped) == blocks * len(expected)
    assert lora_params == sum(rank * (w.lora_a.shape[0] + w.lora_b.shape[1]) for w in wrapped)

    named = backbones.load_decoder(request.getfixturevalue(folder))
    _, info = methods.apply(named.backbone, _config(method="lora", lora_targets=["query", "value"]))
    assert info["targets"] == ["query", "value"] and info["targets_source"] == "--lora_targets"
    assert info["adapted_layers"] == blocks * 2


def test_lora_targets_auto_cannot_be_mixed_with_names(llama_folder):
    from kft import methods
    from kft.models import backbones
    from kft.config import FlagError

    loaded = backbones.load_decoder(llama_folder)
    with pytest.raises(FlagError, match="auto stands alone"):
        methods.apply(loaded.backbone, _config(method="lora", lora_targets=["auto", "gate"]))


@pytest.mark.parametrize("folder,method", [("llama_folder", "lora"), ("llama_folder", "prompt"),
                                           ("gpt2_folder", "lora")])
def test_cached_generation_equals_decoding_the_training_graph_token_by_token(folder, method, request):
    """The KV-cached greedy loop (with prompt vectors placed in the cache for prompt tuning) picks the
    tokens that argmax over the training model's full forward pass picks, one token at a time: over
    the in-place llama cache and over keras-hub's own cache (gpt2)."""
    import keras

    from kft import methods
    from kft.models import backbones
    from kft.methods.prompt import prompt_layer
    from kft.tasks.causal_lm import model as lm_model

    keras.utils.set_random_seed(1)
    loaded = backbones.load_decoder(request.getfixturevalue(folder))
    backbone, _ = methods.apply(loaded.backbone, _config(method=method, num_prompt_tokens=3,
                                                         lora_targets=["query", "value"]))
    model = lm_model.build_model(backbone)
    for v in model.trainable_weights:  # away from the identity start (LoRA B = 0)
        v.assign(np.random.default_rng(0).normal(0, 0.5, v.shape).astype("float32"))
    embedding = lm_model.token_embedding(model)
    prompts = [np.asarray([1, 40, 70, 9], np.int32), np.asarray([1, 300, 5, 120, 9, 70, 40], np.int32)]
    generated, _ = lm_model.Generator(loaded.backbone, loaded.causal_lm_class, [10 ** 6], loaded.pad_id, 2,
                                      prompt=prompt_layer(model))(prompts, 5)
    for prompt, got in zip(prompts, generated):
        seq = list(prompt)
        for _ in range(5):
            ids = np.asarray([seq], np.int32)
            hidden = model({"token_ids": ids, "padding_mask": np.ones_like(ids)})
            seq.append(int(np.argmax(np.asarray(embedding(hidden[:, -1], reverse=True))[0])))
        assert got.tolist() == seq[len(prompt):]


def test_bitfit_is_refused_for_a_decoder_without_biases(llama_folder):
    from kft.models import backbones
    from kft.config import FlagError
    from kft.tasks import causal_lm

    with pytest.raises(FlagError, match="has no bias weights"):
        causal_lm.check_method(backbones.load_decoder(llama_folder).backbone, _config(method="bitfit"))


def test_greedy_generation_does_not_depend_on_the_batch_it_is_in(llama_folder):
    from kft.models import backbones
    from kft.tasks.causal_lm.model import Generator

    loaded = backbones.load_decoder(llama_folder)
    short = np.asarray([1, 40, 70, 9], np.int32)
    long = np.asarray([1, 300, 5, 120, 9, 70, 40, 300, 5, 9, 11], np.int32)
    alone, _ = Generator(loaded.backbone, loaded.causal_lm_class, loaded.stop_ids, loaded.pad_id, 1)([short], 6)
    batched, _ = Generator(loaded.backbone, loaded.causal_lm_class, loaded.stop_ids, loaded.pad_id, 4)(
        [long, short], 6)
    assert alone[0].tolist() == batched[1].tolist()
    assert len(alone[0]) > 0


@pytest.mark.parametrize("folder", ["llama_folder", "gpt2_folder"])
def test_a_run_trains_evaluates_generates_and_writes_predictions(folder, request, tmp_path):
    from kft.training import trainer

    backbone = request.getfixturevalue(folder)
    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(24, 0))
    dev = fx.write_jsonl(tmp_path / "dev.jsonl", fx.chats(6, 1))
    config = _config(backbone=backbone, train_file=train, eval_file=dev, method="lora",
                     lora_targets=["query", "value"], epochs=2, model_dir=str(tmp_path / "m"))
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "m"))
    history = metrics["training"]["history"]
    assert len(history) == 2 and history[1]["val_loss"] < history[0]["val_loss"]
    report = metrics["eval"]
    assert report["perplexity"] == pytest.approx(np.exp(report["loss"]), rel=1e-3)
    assert {"rouge1", "rouge2", "rougeL", "bleu", "exact_match", "mean_generated_tokens"} <= set(report)
    rows = [json.loads(line) for line in open(tmp_path / "m" / "predictions.jsonl")]
    assert len(rows) == 6 and {"prompt", "reference", "prediction"} <= set(rows[0])
    assert os.path.exists(tmp_path / "m" / "adapter.safetensors")


def test_epochs_zero_scores_the_untouched_model(llama_folder, tmp_path):
    from kft.training import trainer

    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(8, 0))
    config = _config(backbone=llama_folder, train_file=train, validation_fraction=0.25, epochs=0,
                     model_dir=str(tmp_path / "m"))
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "m"))
    assert metrics["training"]["steps"] == 0 and metrics["eval"]["generated_examples"] == 2


def test_flags_of_other_tasks_are_refused(llama_folder):
    from kft.training import trainer
    from kft.config import FlagError

    with pytest.raises(FlagError, match="--crf applies to --task=token_classification"):
        trainer.train_and_evaluate(_config(backbone=llama_folder, crf=True), "/tmp/unused")
    with pytest.raises(FlagError, match="--max_new_tokens=9 applies to --task=causal_lm"):
        trainer.train_and_evaluate(_config(task="classification", max_new_tokens=9), "/tmp/unused")


def test_export_writes_a_merged_preset_that_loads_back_as_a_backbone(llama_folder, tmp_path):
    from kft.models import backbones
    from kft.training import trainer

    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(12, 0))
    config = _config(backbone=llama_folder, train_file=train, method="lora", lora_targets=["query", "value"],
                     learning_rate=3e-2, export=True, export_dir=str(tmp_path / "x"), max_new_tokens=0,
                     export_max_new_tokens=4, model_dir=str(tmp_path / "m"))
    fitted = trainer.fit_model(config, str(tmp_path / "m"))
    assert os.path.exists(os.path.join(fitted.metrics["export"], "saved_model.pb"))
    path = str(tmp_path / "m" / "preset")
    reloaded = backbones.load_decoder(path)
    assert reloaded.chat_template == fx.CHATML
    assert not any("lora" in v.path for v in reloaded.backbone.weights)
    from kft.tasks.causal_lm import model as lm_model

    ids = np.asarray([[1, 40, 70, 300, 5]], np.int32)
    hidden = fitted.model({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    np.testing.assert_allclose(_logits(reloaded, ids), np.asarray(
        lm_model.token_embedding(fitted.model)(hidden, reverse=True)), atol=1e-4)
    base = backbones.load_decoder(llama_folder)
    assert np.abs(_logits(reloaded, ids) - _logits(base, ids)).max() > 1e-4  # the update was merged in


# -- forgetting: perplexity on the general-text sample ----------------------------------------------------

@pytest.mark.parametrize("folder", ["llama_folder", "gpt2_folder"])  # without BOS, and with it
def test_general_text_perplexity_is_exp_of_the_mean_negative_log_softmax_of_the_logits(folder, request):
    from kft.models import backbones
    from kft.tasks.causal_lm import perplexity as scorer

    loaded = backbones.load_decoder(request.getfixturevalue(folder))
    texts = ["the cat sat on the mat .", "hello , how are you ? i am fine , thank you ."]
    value, tokens = scorer.perplexity(loaded.backbone, scorer.plain_texts(loaded, texts), batch_size=2)
    nll = []
    for text in texts:
        ids = [loaded.bos_id] if loaded.bos_id is not None else []
        ids += np.asarray(loaded.tokenizer(text)).tolist() + [loaded.eos_id]
        logits = _logits(loaded, np.asarray([ids], np.int32))[0].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_softmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll += [-log_softmax[t, ids[t + 1]] for t in range(len(ids) - 1)]
    assert tokens == len(nll)
    assert value == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)


def test_drift_reports_general_text_perplexity_unchanged_untrained_and_changed_after_training(
        llama_folder, tmp_path):
    from kft.training import drift
    from kft.training import trainer

    rng = np.random.default_rng(0)
    words = fx.TEXT.split()
    train = fx.write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join(rng.choice(words, 8))} for _ in range(8)])
    common = dict(backbone=llama_folder, train_file=train, text_field="text", validation_fraction=0.25, drift=True)
    still = trainer.fit_model(_config(**common, epochs=0), str(tmp_path / "a")).metrics["drift"]["perplexity"]
    assert still["before"] == still["after"] and still["change"] == still["relative_change"] == 0.0
    assert still["texts"] == len(drift.general_text()) and still["tokens"] > still["texts"]
    moved = trainer.fit_model(_config(**common, method="lora", lora_targets=["query", "value"], epochs=2,
                                      learning_rate=3e-2), str(tmp_path / "b")).metrics["drift"]
    perplexity = moved["perplexity"]
    assert np.isfinite([perplexity["before"], perplexity["after"]]).all()
    assert perplexity["before"] == still["before"]  # the base model, before LoRA was applied
    assert perplexity["after"] != perplexity["before"]
    assert perplexity["change"] == pytest.approx(perplexity["after"] - perplexity["before"], abs=1e-3)
    assert (tmp_path / "b" / "drift.png").exists()


def test_prompt_tuning_perplexity_is_the_backbones_unless_the_model_with_its_vectors_is_given(llama_folder):
    from kft import methods
    from kft.models import backbones
    from kft.training import drift
    from kft.tasks.causal_lm import model as lm_model, perplexity as perplexity_scorer

    loaded = backbones.load_decoder(llama_folder)
    start = drift.snapshot(loaded, scorer=perplexity_scorer)
    config = _config(method="prompt", num_prompt_tokens=3)
    model = lm_model.build_model(methods.apply(loaded.backbone, config)[0])
    plain = drift.measure(start, loaded, config)
    assert plain["perplexity"]["after"] == plain["perplexity"]["before"]
    assert "without the prompt vectors" in plain["note"]
    with_vectors = drift.measure(start, loaded, config, model)
    assert with_vectors["perplexity"]["after"] != with_vectors["perplexity"]["before"]
    assert "with its prompt vectors" in with_vectors["note"]


@pytest.mark.slow
@pytest.mark.parametrize("base", ["none", "int8", "int4"])  # LoRA over a float, int8 or int4 base
def test_sigkill_mid_epoch_then_rerun_ends_bit_identical_to_an_uninterrupted_run(llama_folder, tmp_path, base):
    import signal

    from conftest import run_python
    from kft.training import checkpoints
    from test_preemption import _Process, _final, _history

    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(40, 0))
    dev = fx.write_jsonl(tmp_path / "dev.jsonl", fx.chats(6, 1))

    def args(model_dir):
        return ["-m", "kft.train", "--task=causal_lm", f"--backbone={llama_folder}", f"--train_file={train}",
                f"--eval_file={dev}", "--epochs=2", "--batch_size=4", "--learning_rate=1e-3", "--method=lora",
                "--checkpoint_every_steps=4", "--log_every_steps=1", "--max_new_tokens=0", "--deterministic",
                "--noexport", "--nodrift", f"--base_quantization={base}", f"--model_dir={model_dir}"]

    a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
    done = run_python(args(a_dir), env={"KFT_QUIET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    a = _final(a_dir)
    with open(os.path.join(a_dir, "metrics.json")) as f:
        assert json.load(f)["method"].get("base_quantization", {"mode": "none"})["mode"] == base
    run = _Process(args(b_dir))
    run.signal_after(a.step // 2 + 2, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    rerun = run_python(args(b_dir), env={"KFT_QUIET": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr
    b = _final(b_dir)
    assert b.step == a.step and sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k], err_msg=k)
    assert _history(b_dir)["history"] == _history(a_dir)["history"]


# -- the bundled SmolLM2 --------------------------------------------------------------------------------

@pytest.mark.slow
def test_bundled_smollm2_answers_with_its_chat_template():
    from kft.models import backbones
    from kft.tasks.causal_lm import chat
    from kft.tasks.causal_lm.model import Generator

    try:
        loaded = backbones.load_decoder("")
    except backbones.BackboneError as e:
        pytest.skip(f"bundled decoder not installed: {e}")
    prompt = chat.render(loaded.chat_template, [{"role": "user", "content": "What is the capital of France?"}],
                         True, loaded.special_tokens)
    ids, stopped = Generator(loaded.backbone, loaded.causal_lm_class, loaded.stop_ids, loaded.pad_id, 1)(
        [np.asarray(loaded.tokenizer(prompt), np.int32)], 24)
    answer = loaded.tokenizer.detokenize(ids[0])
    answer = answer if isinstance(answer, str) else np.asarray(answer).item().decode()
    assert "Paris" in answer and stopped[0], answer


def _dialogsum_dev(n):
    path = os.path.join(SHARED_DATA, "dialogsum", "dev.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in open(path)][:n]


@pytest.mark.slow
def test_keras_hub_tokenizer_against_the_reference_on_dialogsum_and_its_two_known_differences():
    """keras-hub's byte-level BPE against the reference implementation (Hugging Face `tokenizers` on the
    tokenizer.json converted from the GGUF file, the pre-tokenizer llama.cpp names 'smollm'). They
    differ in two ways (README): keras-hub keeps a run of newlines before a non-space as one piece
    ("\n\n" -> one token, the reference "\n", "\n"), and it splits an apostrophe after punctuation
    off as a contraction ("#'s" -> "#", "'s"; the reference "#'", "s")."""
    tokenizers = pytest.importorskip("tokenizers")
    from kft.models import backbones

    rows = _dialogsum_dev(200)
    loaded = backbones.load_decoder("")
    reference = tokenizers.Tokenizer.from_file(os.path.join(loaded.source, "tokenizer.json"))

    def ours(text):
        return np.asarray(loaded.tokenizer(text)).tolist()

    summaries = [r["summary"] for r in rows]
    same = sum(ours(t) == reference.encode(t).ids for t in summaries)
    print(f"\nidentical token ids: {same} of {len(summaries)} DialogSum dev summaries")
    assert same >= 0.7 * len(summaries)
    plain = [t for t in summaries if "'" not in t and "  " not in t and "\n" not in t]
    assert all(ours(t) == reference.encode(t).ids for t in plain)
    assert len(ours("Done.\n\nNext")) == len(reference.encode("Done.\n\nNext").ids) - 1
    assert ours("#Person1#'s key") != reference.encode("#Person1#'s key").ids


@pytest.mark.slow
def test_tokenizing_a_split_gives_the_ids_of_one_text_at_a_time():
    """keras-hub's BPE tokenizer traced in a tf.function gave other ids from run to run (a cache race);
    kft calls it eagerly, so a split's ids equal each text tokenized on its own."""
    from kft.models import backbones
    from kft.data import inputs
    from kft.tasks.causal_lm import chat

    loaded = backbones.load_decoder("")
    texts = [chat.render(loaded.chat_template, [{"role": "user", "content": "Summarize:\n\n" + r["dialogue"]}],
                         True, loaded.special_tokens) for r in _dialogsum_dev(150)]
    together = inputs.word_pieces(loaded.tokenizer, texts)
    for i, text in enumerate(texts):
        assert together[i].numpy().tolist() == np.asarray(loaded.tokenizer(text)).tolist(), i


@pytest.mark.slow
def test_every_flag_is_in_one_helpfull_group_and_the_groups_are_shown(tmp_path):
    from conftest import run_python
    from kft import config

    grouped = [name for names in config.GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in config.fields())
    proc = run_python(["-m", "kft.train", "--helpfull"])
    for group in ("kft: data:", "kft: decoder LLMs (causal_lm):", "kft: token classification:",
                  "kft: tuning methods:", "kft: optimisation:"):
        assert group in proc.stdout
    decoder = proc.stdout.split("kft: decoder LLMs (causal_lm):")[1].split("\nkft: ")[0]
    assert "--prompt_template" in decoder and "--crf" not in decoder


def test_the_demo_data_reads_and_teaches_one_format():
    import re

    from conftest import ROOT
    from kft.tasks.causal_lm import data

    config = _config()
    pattern = re.compile(r"^category: (billing|shipping|account|technical|refund|other) \| urgency: "
                         r"(low|medium|high) \| reply: .+\.$")
    for name, n in (("support_train.jsonl", 96), ("support_eval.jsonl", 8)):
        split = data.read_file(os.path.join(ROOT, "kft", "sample_data", name), "x", config, "--train_file")
        assert len(split) == n and split.format == "messages"
        assert all(pattern.match(e.completion) for e in split.examples)


def test_compare_prints_both_answers_per_input(tmp_path, capsys):
    from kft import compare

    row = {"line": 1, "input": "where is my parcel", "prompt": "p", "reference": "category: shipping"}
    before = fx.write_jsonl(tmp_path / "a.jsonl", [{**row, "prediction": "I am an AI"}])
    after = fx.write_jsonl(tmp_path / "b.jsonl", [{**row, "prediction": "category: shipping"}])
    assert compare.main(["compare", before, after]) == 0
    out = capsys.readouterr().out
    assert "where is my parcel" in out and "before: I am an AI" in out
    assert "answers equal to the reference: before 0, after 1" in out


def test_a_plain_text_run_with_the_default_export_writes_the_preset_and_no_generating_model(llama_folder, tmp_path):
    from kft.training import trainer

    rng = np.random.default_rng(0)
    words = fx.TEXT.split()
    train = fx.write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join(rng.choice(words, 8))} for _ in range(8)])
    fitted = trainer.fit_model(_config(backbone=llama_folder, train_file=train, text_field="text",
                                       validation_fraction=0.25, export=True, export_dir=str(tmp_path / "x"),
                                       model_dir=str(tmp_path / "m")), str(tmp_path / "m"))
    assert fitted.metrics["export"] == str(tmp_path / "m" / "preset")
    assert os.path.exists(os.path.join(fitted.metrics["export"], "config.json"))
    assert not os.path.exists(tmp_path / "x")
