"""The generating SavedModel of decoder runs (--task=causal_lm): the graph tokenizer gives the training
ids, and the export served from a fresh process that imports only tensorflow and tensorflow_text
generates what the in-memory run generated, and survives what clients send. Tiny random llama
models (tests/decoder_fixtures.py); the bundled SmolLM2 tokenizer in the slow test at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import decoder_fixtures as fx
from conftest import SHARED_DATA

# Loads the export the way a server does: tensorflow and tensorflow_text only.
SERVE = r"""
import json, sys
import tensorflow as tf, tensorflow_text  # noqa: F401
path, prompts = sys.argv[1], json.loads(sys.argv[2])
model = tf.saved_model.load(path)
serve = model.signatures["serving_default"]
out = {}
def run(name, values, signature=serve):
    result = signature(prompt=tf.constant(values, tf.string))
    out[name] = {k: [x.decode("utf-8") if isinstance(x, bytes) else x for x in v.numpy().tolist()]
                 for k, v in result.items()}
run("batch", prompts)
run("one_by_one", prompts[:1])
run("empty_batch", [])
run("first_token_empty_batch", [], model.signatures["first_token"])
run("empty_prompt", [""])
run("long", [" ".join(["paris is the capital of france ."] * 80)])
try:
    serve(prompt=tf.constant([1, 2]))
    out["wrong_dtype"] = "accepted"
except Exception as e:  # what a server answers a client that sent numbers
    out["wrong_dtype"] = type(e).__name__
run("after_error", prompts[:1])
out["modules"] = sorted(sys.modules.keys() & {"keras_hub", "kft"})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(chat_run):
    """A LoRA run on tiny chats, exported: (fitted run, SavedModel path, model_dir); tests/conftest.py's
    chat_run, shared with tests/test_predict_lm.py."""
    return chat_run


def _served(path: str, prompts: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", SERVE, path, json.dumps(prompts)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_export_served_in_a_fresh_process_generates_what_the_in_memory_run_generated(exported):
    _, path, model_dir = exported
    with open(os.path.join(model_dir, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    out = _served(path, [r["input"] for r in rows])
    assert len({r["prediction"] for r in rows}) > 5
    assert out["modules"] == []  # neither kft nor keras-hub is needed to serve
    assert out["batch"]["completion"] == [r["prediction"] for r in rows]
    assert out["batch"]["stopped"] == [r["stopped"] for r in rows]
    assert out["one_by_one"]["completion"] == out["batch"]["completion"][:1]  # rows do not affect each other
    assert all(0 <= n <= 8 for n in out["batch"]["completion_tokens"])
    assert out["batch"]["prompt_tokens_cut"] == [0] * len(rows)


@pytest.mark.slow
def test_the_export_survives_an_empty_batch_an_empty_prompt_a_long_prompt_and_a_wrong_dtype(exported):
    _, path, _ = exported
    out = _served(path, ["what is the capital of france ?"])
    assert out["empty_batch"] == {"completion": [], "completion_tokens": [], "stopped": [],
                                  "prompt_tokens_cut": []}
    assert out["first_token_empty_batch"] == {"token_id": [], "token": [], "prompt_tokens_cut": []}
    assert len(out["empty_prompt"]["completion"]) == 1
    # 80 x 7 words + the chat template do not fit in 256 positions less 8 new tokens: the start is
    # cut and counted, and the rest still generates
    assert out["long"]["prompt_tokens_cut"][0] > 0 and out["long"]["completion_tokens"][0] > 0
    assert out["wrong_dtype"] != "accepted"
    assert out["after_error"]["completion"] == out["batch"]["completion"]


def test_the_export_stores_each_weight_once_and_says_how_it_generates(exported):
    _, path, _ = exported
    with open(os.path.join(path, "assets.extra", "metadata.json")) as f:
        meta = json.load(f)
    assert meta["variables_bytes"] < 1.5 * meta["weight_bytes"] + 1_000_000
    assert meta["generation"]["sampler"] == "greedy" and meta["generation"]["max_new_tokens"] == 8
    assert meta["generation"]["prompt_prefix"] == "<|im_start|>user\n"
    assert meta["generation"]["tokenizer_checked_on"] == 10
    assert set(meta["signatures"]) == {"serving_default", "generate_raw", "first_token", "serve_token_ids"}
    assert not any("lora" in n for n in os.listdir(os.path.join(path, "variables")))


def test_generate_raw_takes_the_formatted_prompt_and_token_log_probs_match_the_model(exported):
    import tensorflow as tf

    from kft.models import savedmodel as export_lib
    from kft.tasks.causal_lm import model as lm_model

    fitted, path, _ = exported
    served = export_lib.load(path)
    with open(os.path.join(path, "assets.extra", "metadata.json")) as f:
        generation = json.load(f)["generation"]
    text = "what is the capital of france ?"
    raw = served.signatures["generate_raw"](
        prompt=tf.constant([generation["prompt_prefix"] + text + generation["prompt_suffix"]]))
    plain = served.signatures["serving_default"](prompt=tf.constant([text]))
    assert raw["completion"].numpy().tolist() == plain["completion"].numpy().tolist()

    ids = np.asarray([[5, 40, 70, 300, 9], [5, 41, 2, 0, 0]], np.int32)
    mask = np.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
    got = served.signatures["serve_token_ids"](token_ids=tf.constant(ids), padding_mask=tf.constant(mask))
    hidden = fitted.model({"token_ids": ids, "padding_mask": mask})
    logits = np.asarray(lm_model.token_embedding(fitted.model)(hidden, reverse=True), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.zeros(ids.shape)
    for b in range(2):
        for t in range(1, int(mask[b].sum())):
            expected[b, t] = log_probs[b, t - 1, ids[b, t]]
    np.testing.assert_allclose(got["token_log_probs"].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(got["next_token_log_probs"].numpy()[1], log_probs[1, 2], atol=1e-4)


@pytest.mark.slow
def test_a_prompt_tuned_run_serves_its_vectors_from_the_kv_cache_as_the_in_memory_run_did(tmp_path):
    import tensorflow as tf

    from kft.models import savedmodel as export_lib
    from kft.training import trainer
    from kft.config import Config
    from kft.tasks.causal_lm import model as lm_model

    # a vector or a token in the wrong cache slot changes this model's greedy tokens
    sharp = fx.write_sharp_llama_folder(str(tmp_path / "sharp_llama"))
    config = Config(task="causal_lm", backbone=sharp, method="prompt", num_prompt_tokens=4,
                    train_file=fx.write_jsonl(tmp_path / "train.jsonl", fx.chats(24, 0)),
                    eval_file=fx.write_jsonl(tmp_path / "eval.jsonl", fx.chats(10, 1)), epochs=1, batch_size=4,
                    learning_rate=3e-2, warmup_ratio=0.0, seed=3, max_new_tokens=8, export=True,
                    export_dir=str(tmp_path / "x"), checkpoint_every_steps=0, run_name="tiny_prompt", drift=False)
    fitted = trainer.fit_model(config, str(tmp_path / "m"))
    path = fitted.metrics["export"]
    with open(tmp_path / "m" / "predictions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    out = _served(path, [r["input"] for r in rows])
    assert len({r["prediction"] for r in rows}) > 5
    assert out["batch"]["completion"] == [r["prediction"] for r in rows]
    assert out["one_by_one"]["completion"] == out["batch"]["completion"][:1]
    assert out["long"]["prompt_tokens_cut"][0] > 0 and out["long"]["completion_tokens"][0] > 0
    with open(os.path.join(path, "assets.extra", "metadata.json")) as f:
        meta = json.load(f)
    assert meta["generation"]["prompt_vectors"] == 4
    assert meta["variables_bytes"] < 1.5 * meta["weight_bytes"] + 1_000_000

    ids = np.asarray([[5, 40, 70, 300, 9]], np.int32)
    mask = np.ones_like(ids)
    got = export_lib.load(path).signatures["serve_token_ids"](token_ids=tf.constant(ids),
                                                              padding_mask=tf.constant(mask))
    embedding = lm_model.token_embedding(fitted.model)
    expected = tf.nn.log_softmax(embedding(fitted.model({"token_ids": ids, "padding_mask": mask}), reverse=True))
    np.testing.assert_allclose(got["next_token_log_probs"].numpy(), expected[:, -1], atol=1e-4)
    base = _endpoints(sharp).token_ids(tf.constant(ids), tf.constant(mask))
    assert np.abs(base["next_token_log_probs"].numpy() - expected[:, -1]).max() > 1e-3  # the vectors count


def _endpoints(llama_folder, **overrides):
    from kft.models import backbones
    from kft.config import Config
    from kft.tasks.causal_lm import serving

    loaded = backbones.load_decoder(llama_folder)
    config = Config(task="causal_lm", max_new_tokens=6, seed=1, **overrides)
    return serving.Endpoints(loaded, config, "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", 64)


def test_first_token_is_the_first_token_of_the_completion(llama_folder):
    import tensorflow as tf

    prompts = tf.constant(["what is the capital of france ?", "paris", "summarize the following dialogue ."])
    endpoints = _endpoints(llama_folder)
    ids, _ = endpoints._generate(endpoints._prompt_ids(
        tf.strings.join([endpoints.prefix, prompts, endpoints.suffix]))[0])
    expected = [row[0] if len(row) else -1 for row in ids.to_list()]
    assert endpoints.first_token(prompts)["token_id"].numpy().tolist() == expected


def test_top_k_of_one_is_greedy_and_sampling_is_fixed_by_the_seed(llama_folder):
    import tensorflow as tf

    prompts = tf.constant(["what is the capital of france ?", "summarize the following dialogue ."])
    greedy = _endpoints(llama_folder).serve(prompts)["completion"].numpy().tolist()
    top1 = _endpoints(llama_folder, export_sampler="top_k", export_top_k=1).serve(prompts)
    assert top1["completion"].numpy().tolist() == greedy
    sampled = [_endpoints(llama_folder, export_sampler="top_p", export_top_p=0.99,
                          export_temperature=2.0).serve(prompts)["completion"].numpy().tolist()
               for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != greedy


def test_the_graph_tokenizer_gives_the_training_ids_for_chats_and_odd_whitespace(llama_folder):
    import tensorflow as tf

    from kft.models import backbones
    from kft.tasks.causal_lm import graph_tokenizer

    loaded = backbones.load_decoder(llama_folder)
    bpe = graph_tokenizer.for_tokenizer(loaded.tokenizer)
    texts = ["what is the capital of france ?", "", "  two  spaces\n\n\ttab", "<|im_start|>user\nparis"
             "<|im_end|>\n<|im_start|>assistant\n", "café, naïve 12345 (paris)!", "x<|im_end|><|im_end|>"]
    tokenize = tf.function(bpe.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
    assert graph_tokenizer.check(tokenize, loaded.tokenizer, texts) == []
    assert [t.decode() for t in bpe.detokenize(tokenize(tf.constant(texts))).numpy()] == texts


def _merge_whole(text: str, merges: list[str]) -> list[str]:
    """Reference byte-level BPE over the whole text as one word: the lowest-ranked pair, leftmost."""
    from kft.tasks.causal_lm.graph_tokenizer import bytes_to_unicode

    mapping, rank = bytes_to_unicode(), {m: i for i, m in enumerate(merges)}
    symbols = [mapping[b] for b in text.encode()]
    while True:
        pairs = [(rank.get(f"{a} {b}", len(rank)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        best = min(pairs, default=(len(rank), 0))
        if best[0] == len(rank):
            return symbols
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]


def test_cutting_a_text_into_words_gives_the_ids_of_merging_it_whole():
    """Texts are cut before runs of spaces, except after a byte that a merge joins to a space."""
    import tensorflow as tf

    from kft.tasks.causal_lm.graph_tokenizer import GraphBPE, bytes_to_unicode

    merges = ["Ċ Ġ", "Ġ b", "a a", "Ġ Ġ", "ĠĠ b", "b Ġ"]  # newline and "b" join a following space
    alphabet = sorted(set(bytes_to_unicode().values()))
    tokens = alphabet + sorted({m.replace(" ", "") for m in merges})
    bpe = GraphBPE({t: i for i, t in enumerate(tokens)}, merges, [])
    assert bpe.joiners == b"\nb"
    texts = ["a\n b", "a b", "aaa  b a", "b b\n\n  b", "   ", "x", "", "ab  \n b  "]
    got = bpe.tokenize(tf.constant(texts)).to_list()
    assert got == [[tokens.index(t) for t in _merge_whole(text, merges)] for text in texts]
    assert bpe._words(tf.constant(["a\n x c", "aa  b x"])).to_list() == [[b"a\n x", b" c"], [b"aa", b"  b x"]]


@pytest.mark.slow
def test_the_graph_tokenizer_gives_smollm2s_training_ids_on_dialogsum_and_chat_prompts():
    import tensorflow as tf

    from kft.models import backbones
    from kft.tasks.causal_lm import chat, graph_tokenizer

    path = os.path.join(SHARED_DATA, "dialogsum", "dev.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present: DialogSum is not in the shared data folder")
    loaded = backbones.load_decoder("")
    with open(path) as f:
        records = [json.loads(line) for line in f.readlines()[:100]]
    texts = [r["dialogue"] for r in records] + [r["summary"] for r in records]
    texts += [chat.render(loaded.chat_template, [{"role": "user", "content": t}], True, loaded.special_tokens)
              for t in texts[:50]]
    bpe = graph_tokenizer.for_tokenizer(loaded.tokenizer)
    tokenize = tf.function(bpe.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
    assert graph_tokenizer.check(tokenize, loaded.tokenizer, texts) == []


@pytest.mark.slow
def test_bench_serve_measures_time_to_first_token_and_decode_speed_of_a_decoder_export(exported):
    from conftest import run_python

    fitted, path, model_dir = exported
    eval_file = fitted.metrics["config"]["eval_file"]
    proc = run_python(["-m", "kft.bench", "--mode=serve", f"--saved_model={path}", "--task=causal_lm",
                       f"--eval_file={eval_file}", "--serve_requests=3", "--serve_prompt_tokens=4",
                       f"--backbone={fitted.metrics['config']['backbone']}",
                       f"--bench_dir={os.path.join(model_dir, 'bench')}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["time_to_first_token"]["requests"] == 3 and result["time_to_first_token"]["p50_ms"] > 0
    assert result["batch_1"]["p50_ms"] >= result["time_to_first_token"]["p50_ms"] * 0.5
    batch = result["batch_16"]
    assert batch["generated_tokens_per_second"] > 0 and batch["first_token_p50_ms"] > 0
    assert batch["decode_tokens_per_second"] > 0
    assert "cut to their first 4 tokens" in result["prompts"]


def test_a_gpt2_decoder_generates_in_the_graph_what_the_evaluation_generator_generates(tmp_path):
    """GPT-2's cache has its own layout and BOS; the graph loop and the evaluation loop agree."""
    import tensorflow as tf

    from kft.models import backbones
    from kft.config import Config
    from kft.tasks.causal_lm import model as lm_model, serving

    loaded = backbones.load_decoder(fx.write_gpt2_folder(str(tmp_path / "gpt2")))
    endpoints = serving.Endpoints(loaded, Config(task="causal_lm", max_new_tokens=6), "", "\n", 64)
    texts = ["what is the capital of france ?", "paris", "summarize the following dialogue . the cat"]
    prompts, cut = endpoints._prompt_ids(tf.constant(texts))
    assert cut.numpy().tolist() == [0, 0, 0]
    graph_ids, _ = endpoints._generate(prompts)
    generator = lm_model.Generator(loaded.backbone, loaded.causal_lm_class, loaded.stop_ids, loaded.pad_id, 4)
    expected, _ = generator([np.asarray(p, np.int32) for p in prompts.to_list()], 6)
    assert graph_ids.to_list() == [e.tolist() for e in expected]


def _reference_beam(endpoints, prompt: list[int], beams: int, max_new_tokens: int, alpha: float) -> list[int]:
    """Beam search written plainly: every hypothesis re-read whole by the model (no cache, no batch)."""
    import tensorflow as tf

    backbone, stop = endpoints.lm.backbone, set(endpoints.stop_ids.numpy().tolist())

    def log_probs(ids):
        hidden = backbone({"token_ids": tf.constant([ids]), "padding_mask": tf.ones([1, len(ids)], tf.int32)})
        return tf.nn.log_softmax(backbone.token_embedding(hidden[:, -1:], reverse=True)[0, 0]).numpy()

    hypotheses = [(list(prompt), 0.0, False, 0)]  # ids, total log p, finished, tokens generated
    for _ in range(max_new_tokens):
        if all(h[2] for h in hypotheses):
            break
        candidates = []
        for ids, score, finished, n in hypotheses:
            if finished:
                candidates.append((ids + [endpoints.pad_id], score, True, n))
                continue
            lp = log_probs(ids)
            for word in np.argsort(-lp)[:beams]:
                candidates.append((ids + [int(word)], score + float(lp[word]), int(word) in stop, n + 1))
        hypotheses = sorted(candidates, key=lambda h: -h[1])[:beams]
    ids, _, _, _ = max(hypotheses, key=lambda h: h[1] / max(h[3], 1) ** alpha)
    generated = ids[len(prompt):]
    cut = [i for i, t in enumerate(generated) if t in stop]
    return generated[:cut[0]] if cut else generated


@pytest.fixture(scope="module")
def sharp_folder(tmp_path_factory) -> str:
    return fx.write_sharp_llama_folder(str(tmp_path_factory.mktemp("sharp_llama")))


def test_beam_search_in_the_graph_finds_the_beams_a_plain_beam_search_finds(sharp_folder):
    import tensorflow as tf

    prompts = tf.constant(["what is the capital of france ?", "paris", "summarize the following dialogue ."])
    for beams, alpha in ((3, 1.0), (2, 0.0)):
        endpoints = _endpoints(sharp_folder, export_sampler="beam", export_num_beams=beams,
                               export_length_penalty=alpha)
        texts = tf.strings.join([endpoints.prefix, prompts, endpoints.suffix])
        serve = tf.function(endpoints._completions, input_signature=[tf.TensorSpec([None], tf.string)])
        got = serve(texts)[0].to_list()  # traced as the export traces it: any batch size
        expected = [_reference_beam(endpoints, row, beams, 6, alpha)
                    for row in endpoints._prompt_ids(texts)[0].to_list()]
        assert got == expected
    greedy = _endpoints(sharp_folder)._completions(texts)[0].to_list()
    one_beam = _endpoints(sharp_folder, export_sampler="beam", export_num_beams=1)._completions(texts)[0]
    assert one_beam.to_list() == greedy
    assert len({tuple(g) for g in got}) > 1  # the model's answers depend on the prompt


def test_beam_search_is_refused_before_training_where_the_export_has_none():
    from kft.config import Config, FlagError
    from kft.tasks.seq2seq import task as s2s_task
    from kft.tasks.causal_lm import task as lm_task

    with pytest.raises(FlagError, match="--export_sampler=beam is built for decoder exports"):
        s2s_task.load_data(Config(task="seq2seq", export_sampler="beam"))
    with pytest.raises(FlagError, match="--export_num_beams=0"):
        lm_task.load_data(Config(task="causal_lm", export_sampler="beam", export_num_beams=0))
