"""kft's training path side by side with keras-hub's recipe and the Hugging Face Trainer.

Every row runs in its own fresh Python process (its peak memory is its own, and TensorFlow and
PyTorch never share threads), one after the other on the same data, backbone, batch size,
learning rate, epochs and seed; ratios between rows are computed from the same invocation so
that machine noise largely cancels. A "machine" process first measures the fp32 matmul rate
that compute efficiency is relative to.

For --task=question_answering the rows are kft and the Hugging Face `run_qa` recipe (keras-hub has
no documented recipe for it), scored by SQuAD exact match and F1, and no serving is measured.
For --task=causal_lm the rows are kft and the Hugging Face Trainer with PEFT's LoRA on the same
converted checkpoint and prompts, scored by eval loss on completion tokens, ROUGE-L and BLEU; the
serving measurement is the decoder export's time to first token and decode speed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

from kft.benchmarks import hf_peers as baselines
from kft.benchmarks import perf
from kft.methods import lora_targets as lora
from kft.config import BUNDLED_BACKBONE, Config, FlagError

ROWS = ("kft", "keras_hub", "hf_trainer")
LABELS = {"kft": "kft", "keras_hub": "keras-hub TextClassifier.fit", "hf_trainer": "Hugging Face Trainer"}
SERVE_MAX_WORDS = 30  # batch-1 latency is measured on texts of at most this many words
QA = "question_answering"
QA_ROWS = ("kft", "hf_trainer")
TARGETS = {"kft_over_hf_train_time": 0.5, "kft_over_keras_hub_train_time": 0.1,
           "accuracy_points_below_hf": 0.5, "kft_compute_efficiency": 0.6, "serve_p50_ms_batch_1": 15.0}
# Question answering: half the Trainer's time at no lower dev F1 (the compute-efficiency target is
# classification's, where the floor of a run is measured).
QA_TARGETS = {"kft_over_hf_train_time": 0.5, "f1_points_below_hf": 0.0}
LM = "causal_lm"
# Decoder fine-tuning: half the Trainer's time at (nearly) the same eval loss and ROUGE-L, and the
# export's first token within half a second at batch 1 (--serve_prompt_tokens=200).
LM_TARGETS = {"kft_over_hf_train_time": 0.5, "eval_loss_above_hf": 0.02, "rougeL_points_below_hf": 0.5,
              "serve_time_to_first_token_s_batch_1": 0.5}
# The tasks whose rows are kft and the Hugging Face recipe only, and why keras-hub's row is not one.
TWO_ROWS = {QA: "keras-hub documents no question-answering fine-tuning recipe",
            LM: "the keras_hub row is keras-hub's TextClassifier recipe, a classifier"}


@dataclasses.dataclass
class Options:
    rows: list
    baseline_max_steps: int
    bench_dir: str
    saved_model: str
    serve_requests: int
    argv: list  # the command line, handed on to each row's process
    serve_prompt_tokens: int = 0  # decoder exports: served prompts cut to this many tokens (0 = whole)


def choose_rows(task: str, requested: list, explicit: bool) -> list:
    """The training rows to run: --rows, except that --task=question_answering and causal_lm have no
    keras_hub row (dropped from the default, refused when asked for)."""
    if task not in TWO_ROWS:
        return list(requested)
    refused = [r for r in requested if r not in QA_ROWS]
    if refused and explicit:
        raise FlagError(f"--rows={','.join(requested)}: --task={task} has no {', '.join(refused)} row "
                        f"({TWO_ROWS[task]}); choose from {', '.join(QA_ROWS)}")
    return [r for r in requested if r in QA_ROWS]


def label(name: str, task: str, method: str = "lora") -> str:
    if task == QA and name == "hf_trainer":
        return baselines.QA_LABEL
    if task == LM and name == "hf_trainer":
        return baselines.lm_label(method)
    return LABELS.get(name, name)


# -- rows (each runs in its own process: python -m kft.bench --mode=row --row=NAME) ------------------

def machine_row(config: Config, options: Options, started: float) -> dict:
    """The fp32 matmul rate, and the backbone's size as FLOPs need it."""
    from kft import tasks
    from kft.models import backbones

    if config.task == LM:
        return _decoder_machine(config)
    loaded = backbones.load(config.backbone)
    hidden = int(loaded.backbone.hidden_dim)
    if config.task == QA:  # the encoder without its pooler, plus the span head (hidden -> start, end)
        model = loaded.backbone
        change = 2 * hidden + 2 - int(sum(np.prod(w.shape) for w in model.weights
                                          if w.path.startswith("pooled_dense")))
    else:
        model = tasks.get(config.task).build_model(loaded.backbone, 2, 0.0, config.pooling)
        change = 0
    parameters = perf.non_embedding_parameters(model) + change
    return {**_rates_and_cpu(config), "non_embedding_parameters": parameters, "layers": loaded.num_layers,
            "hidden": hidden, "total_parameters": int(model.count_params()) + change}


def _rates_and_cpu(config: Config) -> dict:
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    dtype = COMPUTE_DTYPES[config.precision]
    compute_rate = {} if dtype == "float32" else {
        "compute_dtype": dtype, "compute_dtype_matmul_rate": perf.tensorflow_matmul_rate(dtype=dtype)}
    return {"tensorflow_matmul_rate": perf.tensorflow_matmul_rate(), **compute_rate,
            "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}


def _decoder_machine(config: Config) -> dict:
    """A decoder's sizes for FLOPs: its non-embedding weights, and the output projection
    (vocabulary x hidden), which only trained positions need."""
    from kft.models import backbones

    spec = "" if config.backbone == BUNDLED_BACKBONE else config.backbone
    loaded = backbones.load_decoder(spec, config.cache_dir, load_weights=False)
    model = loaded.backbone
    hidden = int(model.hidden_dim)
    return {**_rates_and_cpu(config), "non_embedding_parameters": perf.non_embedding_parameters(model),
            "head_parameters": int(model.vocabulary_size) * hidden, "layers": loaded.num_layers,
            "hidden": hidden, "total_parameters": int(model.count_params())}


def kft_row(config: Config, options: Options, started: float) -> dict:
    """Exactly what `python -m kft.train` runs with these flags, on a fresh model folder."""
    import keras
    import tensorflow as tf

    from kft.training import trainer
    import kft.tasks  # noqa: F401  (registers the tasks with the trainer)

    model_dir = os.path.join(options.bench_dir, "kft_run")
    shutil.rmtree(model_dir, ignore_errors=True)  # a cold run: no checkpoint, no token cache
    qa = config.task == QA  # no serving measurement for question answering: no export needed
    config = dataclasses.replace(config, model_dir=model_dir, run_name="bench", export=not qa,
                                 export_dir=os.path.join(options.bench_dir, "export"))
    trained = trainer.fit_model(config, model_dir)
    m, t = trained.metrics, trained.metrics["training"]
    split = t["train_seconds_split"]
    train = split["steps"] + split["checkpoints"]
    evaluate = split["eval"] + t["eval_seconds"]
    seconds = {"tokenize": t["tokenize_seconds"], "train": train, "eval": evaluate}
    seconds["setup"] = time.time() - started - sum(seconds.values()) - t.get("export_seconds", 0.0)
    epochs = t["epochs_run"]
    lengths = trained.train_lengths.astype(np.float64)
    lm = config.task == LM
    # the floor is not measured for question answering or decoders
    floor = None if qa or lm else _training_floor(trained, config, t)
    if lm:
        answers = _decoder_answers(m, epochs)
    elif qa:
        windows = len(lengths)
        answers = {"train_examples": windows * epochs, "windows": windows,
                   "windows_per_second": windows * epochs / train,
                   "questions": {k: v.get("questions", v.get("examples")) for k, v in m["data"].items()
                                 if isinstance(v, dict) and k in ("train", "eval")},
                   "padding_share": 1.0 - float(lengths.sum()) * epochs / max(float(trained.padded_tokens),
                                                                              1.0),
                   "exact_match": float(m["eval"]["exact_match"]), "f1": float(m["eval"]["f1"]),
                   "dev_accuracy": None}
    else:
        answers = {"train_examples": m["data"]["train"]["examples"] * epochs,
                   "dev_accuracy": m["eval"]["accuracy"]}
    return {
        "label": LABELS["kft"], "status": "full",
        "note": f"{config.precision}; length-grouped batches padded per batch, token ids computed once; "
                "checkpoints included in train time"
                + (f"; windows of {m['sequence_length']} word pieces, stride {config.doc_stride}"
                   if qa else "")
                + (f"; {_method_note(config)}; loss on completion tokens, generation over a KV cache"
                   if lm else ""),
        "seconds": seconds, "export_seconds": t.get("export_seconds"),
        "checkpoint_seconds": split["checkpoints"], "steps_run": t["steps"], "steps_full": t["steps"],
        "real_tokens": float(lengths.sum()) * epochs,
        "real_tokens_squared": float((lengths ** 2).sum()) * epochs,
        "padded_tokens": float(trained.padded_tokens), **answers,
        "train_function_traces": t["train_function_traces"], "num_buckets": config.num_buckets,
        "sequence_length": m["sequence_length"], "export": m.get("export"),
        "first_call_seconds": t["first_call_seconds"], "precision": config.precision, "floor": floor,
        "software": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


COMPUTE_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
SCORES = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "exact_match")


def _method_note(config: Config) -> str:
    if config.method == "lora":
        targets = ",".join(config.lora_targets)
        if targets == "auto":
            targets = "auto (" + ",".join(lora.ALL_LINEAR if config.task in lora.DECODER_TASKS
                                          else lora.ENCODER_DEFAULT) + ")"
        return f"LoRA r={config.lora_rank} alpha={config.lora_alpha:g} on {targets}"
    return f"--method={config.method}"


def _decoder_answers(m: dict, epochs: int) -> dict:
    """kft's causal_lm row from its metrics.json: trained (completion) tokens, eval loss, scores."""
    data, scores = m["data"], m["eval"]
    trained = int(data["train"]["trained_tokens"])
    generation = None
    if "generated_examples" in scores:
        generation = {"examples": scores["generated_examples"], "seconds": scores["generation_seconds"],
                      "mean_tokens": scores["mean_generated_tokens"], "stopped_at_eos": scores["stopped_at_eos"],
                      "tokens_per_second": scores["generated_tokens_per_second"]}
    return {"train_examples": data["train"]["examples"] * epochs, "trained_tokens": trained,
            "trained_tokens_run": trained * epochs, "eval_trained_tokens": int(data["eval"]["trained_tokens"]),
            "trainable_parameters": int(m["parameters"]["trainable"]),
            "eval_loss": float(scores["loss"]), "perplexity": float(scores["perplexity"]),
            **{k: scores.get(k) for k in SCORES}, "generation": generation, "dev_accuracy": None}


def _training_floor(trained, config: Config, training: dict) -> dict:
    """perf.training_floor for the batches this run trained on (its plan, every epoch)."""
    from kft.data import inputs

    backbone = next(layer for layer in trained.model.layers if hasattr(layer, "hidden_dim"))
    hidden, layers = int(backbone.hidden_dim), int(backbone.num_layers)
    widths = np.concatenate([
        inputs.train_plan(trained.train_lengths, config.batch_size, config.num_buckets, config.seed, e,
                          training["static_shapes"]).widths for e in range(training["epochs_run"])])
    rows = widths.astype(np.int64) * config.batch_size
    attention = 12.0 * layers * hidden * config.batch_size * float(np.sum(widths.astype(np.float64) ** 2))
    return perf.training_floor(perf.kernel_matmuls(trained.model, hidden), rows, attention,
                               [tuple(int(d) for d in v.shape) for v in trained.model.trainable_variables],
                               COMPUTE_DTYPES[config.precision])


def keras_hub_row(config: Config, options: Options, started: float) -> dict:
    return baselines.keras_hub_recipe(config, options.baseline_max_steps, started)


def hf_trainer_row(config: Config, options: Options, started: float) -> dict:
    if config.task == QA:
        return baselines.hf_question_answering(config, started)
    if config.task == LM:
        return baselines.hf_causal_lm(config, started)
    return baselines.hf_trainer(config, started)


def _serve_texts(config: Config) -> list[str]:
    from kft.data import sources as data_lib

    texts = []
    if config.task == "token_classification" and (config.train_file or config.dataset):
        from kft import tasks

        sentences = tasks.get("token_classification").load_data(config).eval.words
        texts = [" ".join(words) for words in sentences if len(words) <= SERVE_MAX_WORDS]
    elif config.train_file or config.dataset:
        data = data_lib.load(config)
        texts = [t for t in data.eval.texts if len(t.split()) <= SERVE_MAX_WORDS]
    return texts or ["a gripping , beautifully acted film that stays with you long after it ends",
                     "the plot is thin and the jokes fall flat", "an honest , moving portrait",
                     "two hours of my life i will never get back"]


def serve_row(config: Config, options: Options, started: float) -> dict:
    """Latency and throughput of the export's `serving_default` on raw strings, in this process."""
    import tensorflow as tf

    from kft.models import savedmodel as export

    path = options.saved_model
    if not path:
        raise ValueError("--mode=serve needs --saved_model=<export folder>")
    t0 = time.time()
    loaded = export.load(path)
    load_seconds = time.time() - t0
    if "generate_raw" in loaded.signatures:
        return serve_decoder(loaded, path, load_seconds, config, options)
    serve = loaded.signatures["serving_default"]
    texts = _serve_texts(config)
    rng = np.random.default_rng(config.seed)

    def call(batch):  # every output read back, as a client would (tags and entities for NER)
        return [v.numpy() for v in serve(text=tf.constant(batch)).values()]

    for i in range(20):
        call([texts[i % len(texts)]])
    single = []
    for i in rng.integers(0, len(texts), options.serve_requests):
        t = time.perf_counter()
        call([texts[i]])
        single.append(time.perf_counter() - t)
    batches = []
    for _ in range(3):
        call([texts[i] for i in rng.integers(0, len(texts), 64)])
    for _ in range(max(10, options.serve_requests // 10)):
        batch = [texts[i] for i in rng.integers(0, len(texts), 64)]
        t = time.perf_counter()
        call(batch)
        batches.append(time.perf_counter() - t)
    single, batches = np.asarray(single) * 1e3, np.asarray(batches)
    return {
        "saved_model": path, "load_seconds": load_seconds,
        "texts": f"{len(texts)} texts of at most {SERVE_MAX_WORDS} words, mean "
                 f"{np.mean([len(t.split()) for t in texts]):.1f} words",
        "batch_1": {"requests": len(single), "p50_ms": float(np.percentile(single, 50)),
                    "p99_ms": float(np.percentile(single, 99)), "mean_ms": float(single.mean())},
        "batch_64": {"requests": len(batches), "p50_ms": float(np.percentile(batches, 50) * 1e3),
                     "texts_per_second": float(64 * len(batches) / batches.sum())},
        "peak_rss_bytes": perf.peak_rss_bytes(),
    }


DECODER_BATCH = 16


def _decoder_prompts(config: Config, path: str, prompt_tokens: int) -> tuple[list[str], str]:
    """Served inputs from --eval_file (or --train_file); with `prompt_tokens`, each cut to its
    first that many tokens by the run's tokenizer (shorter ones are left out and counted)."""
    from kft.models import backbones
    from kft.tasks.causal_lm import data as lm_data

    source = config.eval_file or config.train_file
    if not source:
        raise ValueError("--mode=serve of a decoder export needs prompts: give --eval_file (JSONL in the "
                         "run's format)")
    split = lm_data.read_file(source, "eval", config, "--eval_file" if config.eval_file else "--train_file")
    texts = [e.served if e.served is not None else e.messages[-1]["content"]
             for e in split.examples if e.messages]
    described = f"{len(texts)} inputs of {source}"
    if prompt_tokens:
        with open(os.path.join(path, "assets.extra", "metadata.json")) as f:
            meta = json.load(f)
        # the run's tokenizer: its preset when it is still there, else the backbone it started from
        preset = meta.get("preset")
        spec = preset if preset and os.path.isdir(preset) else meta.get("backbone", {}).get("spec", config.backbone)
        tokenizer = backbones.load_decoder(spec, load_weights=False).tokenizer
        cut = []
        for text in texts:
            ids = np.asarray(tokenizer(text))
            if len(ids) >= prompt_tokens:
                piece = tokenizer.detokenize(ids[:prompt_tokens])
                cut.append(piece.numpy().decode("utf-8", "replace") if hasattr(piece, "numpy") else str(piece))
        described += (f", cut to their first {prompt_tokens} tokens ({len(texts) - len(cut)} shorter "
                      "ones left out)")
        texts = cut
    if not texts:
        raise ValueError(f"no prompt to serve from {source}")
    return texts, described


def serve_decoder(loaded, path: str, load_seconds: float, config: Config, options: Options) -> dict:
    """A decoder export: time to first token (first_token at batch 1), per-sequence decode speed at
    batch 1 (serving_default), and generated tokens per second at batch 16."""
    import tensorflow as tf

    texts, described = _decoder_prompts(config, path, options.serve_prompt_tokens)
    first, serve = loaded.signatures["first_token"], loaded.signatures["serving_default"]
    requests = min(options.serve_requests, 20)
    rng = np.random.default_rng(config.seed)
    picks = [texts[i] for i in rng.integers(0, len(texts), requests)]

    def timed(signature, batch):
        t = time.perf_counter()
        out = {k: v.numpy() for k, v in signature(prompt=tf.constant(batch)).items()}
        return time.perf_counter() - t, out

    for text in picks[:2]:  # the first calls trace the graphs
        timed(first, [text])
        timed(serve, [text])
    ttft = np.asarray([timed(first, [text])[0] for text in picks])
    single = [timed(serve, [text]) for text in picks]
    latency = np.asarray([t for t, _ in single])
    tokens = np.asarray([int(out["completion_tokens"][0]) for _, out in single])
    decode = float(np.sum(np.maximum(tokens - 1, 0)) / max(1e-9, np.sum(latency - np.median(ttft))))
    batches = [[texts[i] for i in rng.integers(0, len(texts), DECODER_BATCH)] for _ in range(3)]
    timed(first, batches[0])
    timed(serve, batches[0])
    # A batch's first token costs its whole prefill (16 prompts of --serve_prompt_tokens each), which
    # can outweigh its decode steps; both are timed on the same batches so the two can be told apart.
    prefill = [timed(first, batch)[0] for batch in batches]
    runs = [timed(serve, batch) for batch in batches]
    generated = sum(int(out["completion_tokens"].sum()) for _, out in runs)
    # every row's first token came with the prefill
    decoded = sum(int(np.maximum(out["completion_tokens"] - 1, 0).sum()) for _, out in runs)
    decode_seconds = sum(t for t, _ in runs) - sum(prefill)
    with open(os.path.join(path, "assets.extra", "metadata.json")) as f:
        generation = json.load(f).get("generation", {})
    return {
        "saved_model": path, "load_seconds": load_seconds, "prompts": described,
        "generation": {k: generation.get(k) for k in ("sampler", "max_new_tokens")},
        "time_to_first_token": {"requests": len(ttft), "p50_ms": float(np.median(ttft) * 1e3),
                                "p90_ms": float(np.percentile(ttft, 90) * 1e3)},
        "batch_1": {"requests": len(latency), "p50_ms": float(np.median(latency) * 1e3),
                    "mean_completion_tokens": float(tokens.mean()),
                    "decode_tokens_per_second": decode},
        f"batch_{DECODER_BATCH}": {"requests": len(runs), "p50_ms": float(np.median([t for t, _ in runs]) * 1e3),
                                   "generated_tokens_per_second": generated / sum(t for t, _ in runs),
                                   "first_token_p50_ms": float(np.median(prefill) * 1e3),
                                   "decode_tokens_per_second": decoded / max(1e-9, decode_seconds)},
        "peak_rss_bytes": perf.peak_rss_bytes(),
    }


RUNNERS = {"machine": machine_row, "kft": kft_row, "keras_hub": keras_hub_row,
           "hf_trainer": hf_trainer_row, "serve": serve_row}


def run_row(name: str, config: Config, options: Options, started: float) -> dict:
    result = RUNNERS[name](config, options, started)
    result.setdefault("peak_rss_bytes", perf.peak_rss_bytes())
    result.setdefault("process_seconds", time.time() - started)
    return result


# -- the orchestrating process --------------------------------------------------------------------

def _child(name: str, options: Options, extra: tuple = (), row_label: str = "") -> dict:
    """Runs one row in a fresh interpreter; a failure becomes a row that says so."""
    out = os.path.join(options.bench_dir, f"{name}.json")
    log = os.path.join(options.bench_dir, f"{name}.log")
    cmd = [sys.executable, "-m", "kft.bench", *options.argv, "--mode=row", f"--row={name}",
           f"--row_output={out}", *extra]
    print(f"[bench] {name}: running (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if status != 0 or not os.path.exists(out):
        with open(log) as f:
            lines = [line.strip() for line in f if line.strip()]
        return {"label": row_label or LABELS.get(name, name), "status": "failed",
                "note": f"exit status {status}: {lines[-1] if lines else ''} (see {log})"}
    with open(out) as f:
        result = json.load(f)
    print(f"[bench] {name}: done in {time.time() - t0:.0f}s", flush=True)
    return result


def summarize(machine: dict, rows: dict, serve: dict | None, config: Config) -> dict:
    """Derived rates, compute efficiency and the ratios the targets are stated in."""
    peak = machine["tensorflow_matmul_rate"]["flops_per_second"]
    for row in rows.values():
        if "seconds" not in row:
            continue
        s = row["seconds"]
        train = s["train"]
        row["flops"] = perf.training_flops(row["real_tokens"], row["real_tokens_squared"],
                                           machine["non_embedding_parameters"], machine["layers"],
                                           machine["hidden"])
        if "head_parameters" in machine and "trained_tokens_run" in row:
            # decoders: the vocabulary projection, at the trained positions only
            row["flops"] += 6.0 * machine["head_parameters"] * row["trained_tokens_run"]
        row["examples_per_second"] = row["train_examples"] / train
        row["real_tokens_per_second"] = row["real_tokens"] / train
        row["compute_efficiency"] = row["flops"] / train / peak
        if "compute_dtype_matmul_rate" in machine:  # against the rate of the dtype the matmuls ran in
            row["compute_efficiency_in_compute_dtype"] = (
                row["flops"] / train / machine["compute_dtype_matmul_rate"]["flops_per_second"])
        if row.get("floor"):
            # The most this run's plan could reach: its FLOPs over the floor time instead of train time.
            row["efficiency_ceiling"] = row["flops"] / row["floor"]["floor_seconds"] / peak
            if "compute_dtype_matmul_rate" in machine:
                dtype_peak = machine["compute_dtype_matmul_rate"]["flops_per_second"]
                row["efficiency_ceiling_in_compute_dtype"] = row["efficiency_ceiling"] * peak / dtype_peak
        # token counts are the full run's, also for subset rows (whose times are implied)
        row["padding_overhead"] = row["padded_tokens"] / row["real_tokens"] - 1.0
        if config.task == QA:  # examples are windows
            row["windows_per_second"] = row["examples_per_second"]
        if config.task in (QA, LM):  # padding as the share of positions computed
            row["padding_share"] = 1.0 - row["real_tokens"] / row["padded_tokens"]
        row["seconds"]["total"] = sum(s[k] for k in ("setup", "tokenize", "train", "eval"))
    ratios = {}
    kft = rows.get("kft", {})
    for other, short in (("hf_trainer", "hf"), ("keras_hub", "keras_hub")):
        if "seconds" in kft and "seconds" in rows.get(other, {}):
            ratios[f"kft_over_{short}_train_time"] = kft["seconds"]["train"] / rows[other]["seconds"]["train"]
            ratios[f"kft_over_{short}_total_time"] = kft["seconds"]["total"] / rows[other]["seconds"]["total"]
    hf = rows.get("hf_trainer", {})
    if kft.get("dev_accuracy") is not None and hf.get("dev_accuracy") is not None:
        ratios["accuracy_points_below_hf"] = 100.0 * (hf["dev_accuracy"] - kft["dev_accuracy"])
    for measure in ("exact_match", "f1"):  # question answering, in percent already
        if kft.get(measure) is not None and hf.get(measure) is not None:
            ratios[f"{measure}_points_below_hf"] = hf[measure] - kft[measure]
    if kft.get("eval_loss") is not None and hf.get("eval_loss") is not None:  # decoders
        ratios["eval_loss_above_hf"] = kft["eval_loss"] - hf["eval_loss"]
    for measure in ("rougeL", "bleu"):  # decoders, in points already
        if kft.get(measure) is not None and hf.get(measure) is not None:
            ratios[f"{measure}_points_below_hf"] = hf[measure] - kft[measure]
    if "compute_efficiency" in kft:
        ratios["kft_compute_efficiency"] = kft["compute_efficiency"]
    if serve and "time_to_first_token" in serve:  # a decoder export
        ratios["serve_time_to_first_token_s_batch_1"] = serve["time_to_first_token"]["p50_ms"] / 1e3
    elif serve and "batch_1" in serve:
        ratios["serve_p50_ms_batch_1"] = serve["batch_1"]["p50_ms"]
    chosen = {QA: QA_TARGETS, LM: LM_TARGETS}.get(config.task, TARGETS)
    targets = {k: {"value": ratios[k], "target": v, "met": ratios[k] <= v if k != "kft_compute_efficiency"
                   else ratios[k] >= v} for k, v in chosen.items() if k in ratios}
    return {"config": dataclasses.asdict(config), "machine": machine, "rows": rows, "serve": serve,
            "ratios": ratios, "targets": targets}


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _row_table(report: dict, head: tuple, cells) -> list[str]:
    """The rows as fixed-width lines: label, status, then `cells(row, seconds)`; rows that did not
    run show their status only."""
    lines = []
    for row in report["rows"].values():
        if "seconds" not in row:
            lines.append((row["label"], row["status"]) + ("",) * (len(head) - 2))
        else:
            lines.append((row["label"], row["status"]) + tuple(cells(row, row["seconds"])))
    return _columns(head, lines)


def _rate_line(machine: dict, efficiency: str) -> str:
    return (f"fp32 matmul rate (TensorFlow, best square matmul): "
            f"{machine['tensorflow_matmul_rate']['flops_per_second'] / 1e9:.0f} GFLOP/s on {machine['cpus']} "
            f"CPUs ({machine['cpu']}); efficiency = {efficiency}")


def table(report: dict) -> str:
    """The report as a fixed-width text table (subset rows' implied numbers marked with *)."""
    if report["config"].get("task") == QA:
        return _qa_table(report)
    if report["config"].get("task") == LM:
        return _lm_table(report)
    head = ("system", "status", "setup s", "tokenize s", "train s", "eval s", "ex/s", "real tok/s",
            "padding", "efficiency", "peak RSS", "dev acc")
    def cells(row, s):
        star = "*" if row["status"] == "subset" else ""
        return (f"{s['setup']:.1f}", f"{s['tokenize']:.1f}", f"{s['train']:.1f}{star}", f"{s['eval']:.1f}{star}",
                f"{row['examples_per_second']:.1f}", f"{row['real_tokens_per_second']:.0f}",
                f"{100 * row['padding_overhead']:.0f}%", f"{100 * row['compute_efficiency']:.1f}%",
                f"{row['peak_rss_bytes'] / 1e9:.2f} GB", _fmt(row.get("dev_accuracy"), ".4f"))

    out = _row_table(report, head, cells)
    m = report["machine"]
    out.append(_rate_line(m, "model FLOPs on real tokens / train time / that rate"))
    if "compute_dtype_matmul_rate" in m:
        rate = m["compute_dtype_matmul_rate"]["flops_per_second"]
        against = ", ".join(f"{r['label']} {100 * r['compute_efficiency_in_compute_dtype']:.1f}%"
                            for r in report["rows"].values() if "compute_efficiency_in_compute_dtype" in r)
        out.append(f"{m['compute_dtype']} matmul rate: {rate / 1e9:.0f} GFLOP/s; efficiency against it: "
                   f"{against}")
    for row in report["rows"].values():
        out.append(f"  {row['label']}: {row.get('note', '')}")
        floor = row.get("floor")
        if floor:
            other = row.get("efficiency_ceiling_in_compute_dtype")
            other = f" ({100 * other:.1f}% of the {m['compute_dtype']} rate)" if other is not None else ""
            out.append(f"    floor for these {floor['steps']} steps: {floor['floor_seconds']:.1f} s = kernel "
                       f"matmuls {floor['matmul_seconds']:.1f} s ({floor['kernel_rate'] / 1e9:.0f} GFLOP/s "
                       f"at their shapes, {floor['dtype']}) + attention {floor['attention_seconds']:.1f} s + "
                       f"fused Adam {floor['adam_seconds']:.1f} s, all else zero: efficiency at most "
                       f"{100 * row['efficiency_ceiling']:.1f}% of the fp32 rate{other}; the first call "
                       f"(tracing) took {row.get('first_call_seconds') or 0:.1f} s")
    out.extend(_target_lines(report))
    serve = report.get("serve")
    if serve and "batch_1" in serve:
        out.append(f"serving_default ({serve['texts']}): batch 1 p50 {serve['batch_1']['p50_ms']:.1f} ms, "
                   f"p99 {serve['batch_1']['p99_ms']:.1f} ms; batch 64 p50 {serve['batch_64']['p50_ms']:.0f} "
                   f"ms, {serve['batch_64']['texts_per_second']:.0f} texts/s")
    elif serve:
        out.append(f"serving: {serve.get('status')}: {serve.get('note')}")
    return "\n".join(out)


def _target_lines(report: dict) -> list[str]:
    out = []
    for k, v in report["targets"].items():
        out.append(f"target {k}: {v['value']:.3f} (target {'>=' if k == 'kft_compute_efficiency' else '<='} "
                   f"{v['target']}) {'met' if v['met'] else 'NOT met'}")
    return out


def _columns(head: tuple, lines: list) -> list[str]:
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    out = ["  ".join(str(x[i]).ljust(widths[i]) for i in range(len(head))) for x in [head] + lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _qa_table(report: dict) -> str:
    """Question answering: SQuAD exact match and F1 in place of accuracy, windows in place of
    examples, padding as the share of positions computed; no floor or serving."""
    head = ("system", "status", "setup s", "tokenize s", "train s", "eval s", "windows/s", "real tok/s",
            "padding", "efficiency", "peak RSS", "dev EM", "dev F1")
    out = _row_table(report, head, lambda row, s: (
        f"{s['setup']:.1f}", f"{s['tokenize']:.1f}", f"{s['train']:.1f}", f"{s['eval']:.1f}",
        f"{row['windows_per_second']:.1f}", f"{row['real_tokens_per_second']:.0f}",
        f"{100 * row['padding_share']:.0f}%", f"{100 * row['compute_efficiency']:.1f}%",
        f"{row['peak_rss_bytes'] / 1e9:.2f} GB", _fmt(row.get("exact_match"), ".2f"), _fmt(row.get("f1"), ".2f")))
    out.append(_rate_line(report["machine"], "model FLOPs on real tokens / train time / that rate; "
                          "padding = padded positions / all positions trained on"))
    for row in report["rows"].values():
        questions = row.get("questions")
        about = (f" [{questions.get('train')} train / {questions.get('eval')} eval questions, "
                 f"{row.get('windows')} train windows]" if isinstance(questions, dict) else "")
        out.append(f"  {row['label']}: {row.get('note', '')}{about}")
    ratios = report["ratios"]
    out.append("kft train time / Hugging Face train time: "
               f"{_fmt(ratios.get('kft_over_hf_train_time'), '.3f')}; "
               f"EM points below HF: {_fmt(ratios.get('exact_match_points_below_hf'), '+.2f')}, "
               f"F1 points below HF: {_fmt(ratios.get('f1_points_below_hf'), '+.2f')}")
    out.extend(_target_lines(report))
    out.append("training floor: n/a for question answering; serving: not measured for question answering")
    return "\n".join(out)


def _lm_table(report: dict) -> str:
    """Decoder fine-tuning: eval loss on completion tokens, ROUGE-L and BLEU of greedy generations,
    the trained tokens each row counted, and the export's time to first token and decode speed."""
    head = ("system", "status", "setup s", "tokenize s", "train s", "eval s", "real tok/s", "padding",
            "efficiency", "peak RSS", "eval loss", "ROUGE-L", "BLEU")
    out = _row_table(report, head, lambda row, s: (
        f"{s['setup']:.1f}", f"{s['tokenize']:.1f}", f"{s['train']:.1f}", f"{s['eval']:.1f}",
        f"{row['real_tokens_per_second']:.0f}", f"{100 * row['padding_share']:.0f}%",
        f"{100 * row['compute_efficiency']:.1f}%", f"{row['peak_rss_bytes'] / 1e9:.2f} GB",
        _fmt(row.get("eval_loss"), ".4f"), _fmt(row.get("rougeL"), ".2f"), _fmt(row.get("bleu"), ".2f")))
    out.append(_rate_line(report["machine"], "model FLOPs on real tokens (vocabulary projection at trained "
                          "positions only) / train time / that rate; padding = padded positions / all "
                          "positions trained on"))
    for row in report["rows"].values():
        about = ""
        if "trained_tokens" in row:
            generation = row.get("generation") or {}
            about = (f" [{row['train_examples']} train examples, {row['trained_tokens']} trained (completion) "
                     f"tokens per epoch, {row.get('eval_trained_tokens')} eval tokens, "
                     f"{row.get('trainable_parameters')} trainable parameters"
                     + (f"; generated for {generation['examples']} prompts in {generation['seconds']:.1f} s, "
                        f"mean {generation['mean_tokens']:.1f} tokens" if generation else "") + "]")
        out.append(f"  {row['label']}: {row.get('note', '')}{about}")
    kft, hf = report["rows"].get("kft", {}), report["rows"].get("hf_trainer", {})
    if "trained_tokens" in kft and "trained_tokens" in hf:
        gap = hf["trained_tokens"] - kft["trained_tokens"]
        out.append(f"trained tokens per epoch: kft {kft['trained_tokens']}, Hugging Face {hf['trained_tokens']}"
                   + (" (the same)" if gap == 0 else f" ({gap:+d}: the two tokenizers split some text "
                                                     "differently)"))
    ratios = report["ratios"]
    out.append("kft train time / Hugging Face train time: "
               f"{_fmt(ratios.get('kft_over_hf_train_time'), '.3f')}; eval loss above HF: "
               f"{_fmt(ratios.get('eval_loss_above_hf'), '+.4f')}, ROUGE-L points below HF: "
               f"{_fmt(ratios.get('rougeL_points_below_hf'), '+.2f')}, BLEU points below HF: "
               f"{_fmt(ratios.get('bleu_points_below_hf'), '+.2f')}")
    out.extend(_target_lines(report))
    out.append("training floor: n/a for causal_lm")
    serve = report.get("serve")
    if serve and "time_to_first_token" in serve:
        first, single = serve["time_to_first_token"], serve["batch_1"]
        batch = serve.get(f"batch_{DECODER_BATCH}", {})
        out.append(f"serving ({serve['prompts']}): time to first token p50 {first['p50_ms']:.0f} ms "
                   f"(p90 {first['p90_ms']:.0f} ms) at batch 1; batch-1 decode "
                   f"{single['decode_tokens_per_second']:.1f} tokens/s; batch {DECODER_BATCH}: "
                   f"{_fmt(batch.get('generated_tokens_per_second'), '.1f')} generated tokens/s overall "
                   f"(first token p50 {_fmt(batch.get('first_token_p50_ms'), '.0f')} ms, then "
                   f"{_fmt(batch.get('decode_tokens_per_second'), '.1f')} decode tokens/s)")
    elif serve:
        out.append(f"serving: {serve.get('status')}: {serve.get('note')}")
    else:
        out.append("serving: not measured (no export)")
    return "\n".join(out)


def chart(report: dict, path: str) -> None:
    from kft.reporting import plots

    rows = [r for r in report["rows"].values() if "seconds" in r]
    labels = [r["label"] + (" (implied)" if r["status"] == "subset" else "") for r in rows]
    if report["config"].get("task") == QA:
        panels = [("training time, s (lower is better)", [r["seconds"]["train"] for r in rows]),
                  ("training windows/s", [r["windows_per_second"] for r in rows]),
                  ("peak memory, GB", [r["peak_rss_bytes"] / 1e9 for r in rows]),
                  ("dev exact match, %", [r.get("exact_match") for r in rows]),
                  ("dev F1, %", [r.get("f1") for r in rows])]
    elif report["config"].get("task") == LM:
        panels = [("training time, s (lower is better)", [r["seconds"]["train"] for r in rows]),
                  ("real training tokens/s", [r["real_tokens_per_second"] for r in rows]),
                  ("peak memory, GB", [r["peak_rss_bytes"] / 1e9 for r in rows]),
                  ("eval loss (lower is better)", [r.get("eval_loss") for r in rows]),
                  ("ROUGE-L", [r.get("rougeL") for r in rows])]
    else:
        panels = [("training time, s (lower is better)", [r["seconds"]["train"] for r in rows]),
                  ("training examples/s", [r["examples_per_second"] for r in rows]),
                  ("compute efficiency, % of fp32 matmul rate",
                   [100 * r["compute_efficiency"] for r in rows]),
                  ("dev accuracy", [r.get("dev_accuracy") for r in rows])]
    plots.benchmark_bars(labels, panels, [r["status"] == "subset" for r in rows], path,
                         f"{report['config']['train_file'] or report['config']['dataset']}, batch "
                         f"{report['config']['batch_size']}, {report['config']['epochs']} epoch(s)")


def run_training(config: Config, options: Options) -> dict:
    """All training rows, then the serving measurement of kft's export; writes JSON and PNG."""
    os.makedirs(options.bench_dir, exist_ok=True)
    machine = _child("machine", options)
    if machine.get("status") == "failed":
        raise RuntimeError(f"measuring the machine failed: {machine['note']}")
    rows = {}
    for name in options.rows:
        row_label = label(name, config.task, config.method)
        missing = name == "hf_trainer" and baselines.hf_trainer_missing(config)
        if missing:
            rows[name] = {"label": row_label, "status": "not run",
                          "note": f"{missing} is not installed (pip install -e '.[bench]')"}
            continue
        rows[name] = _child(name, options, row_label=row_label)
    serve = None
    if rows.get("kft", {}).get("export"):
        serve = _child("serve", options, (f"--saved_model={rows['kft']['export']}",))
    report = summarize(machine, rows, serve, config)
    write(report, options.bench_dir)
    return report


def run_serving(config: Config, options: Options) -> dict:
    os.makedirs(options.bench_dir, exist_ok=True)
    serve = _child("serve", options)
    if serve.get("status") == "failed":
        raise RuntimeError(f"the serving measurement failed: {serve['note']}")
    with open(os.path.join(options.bench_dir, "serve.json"), "w") as f:
        json.dump(serve, f, indent=2)
    return serve


def write(report: dict, bench_dir: str) -> None:
    with open(os.path.join(bench_dir, "bench.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    chart(report, os.path.join(bench_dir, "bench.png"))
