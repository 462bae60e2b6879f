"""Flag declarations: every flag's --helpfull group and the tasks that read it, as released, a flag of
another task refused, a mistyped flag failing, and docs/flags.md matching the declarations."""

import dataclasses
import os

import pytest
from absl import flags

from conftest import ROOT
from kft import config as config_lib
from kft import flag_reference
from kft.config import Config, FlagError

ALL = None  # every task reads the flag
CLS = ("classification",)
TOK = ("token_classification",)
QA = ("question_answering",)
LM = ("causal_lm",)
CLS_TOK = ("classification", "token_classification")
CLS_LM = ("classification", "causal_lm")
ENC = ("classification", "token_classification", "question_answering")
GEN = ("causal_lm", "seq2seq")
TASKS = ("classification", "token_classification", "question_answering", "causal_lm", "seq2seq")

# flag: (--helpfull group, tasks that read it), in declaration order.
EXPECTED = {
    'task': ('task and method', ALL),
    'method': ('task and method', ALL),
    'adapter': ('task and method', ALL),
    'dataset': ('data', ALL),
    'data_dir': ('data', ALL),
    'train_split': ('data', ALL),
    'eval_split': ('data', ALL),
    'train_file': ('data', ALL),
    'eval_file': ('data', ALL),
    'test_file': ('data', ALL),
    'text_field': ('data', CLS_LM),
    'label_field': ('classification', CLS),
    'label_names': ('classification', CLS),
    'num_classes': ('classification', CLS),
    'validation_fraction': ('data', ALL),
    'tag_column': ('token classification', TOK),
    'stride': ('token classification', TOK),
    'max_train_examples': ('data', ALL),
    'max_train_examples_per_class': ('classification', CLS),
    'max_eval_examples': ('data', ALL),
    'doc_stride': ('question answering', QA),
    'max_query_length': ('question answering', QA),
    'n_best': ('question answering', QA),
    'max_answer_length': ('question answering', QA),
    'null_score_threshold': ('question answering', QA),
    'fix_answer_offsets': ('question answering', QA),
    'prompt_field': ('decoder LLMs (causal_lm)', GEN),
    'completion_field': ('decoder LLMs (causal_lm)', GEN),
    'messages_field': ('decoder LLMs (causal_lm)', GEN),
    'prompt_template': ('decoder LLMs (causal_lm)', GEN),
    'chat_template': ('decoder LLMs (causal_lm)', LM),
    'train_on_prompt': ('decoder LLMs (causal_lm)', LM),
    'max_new_tokens': ('decoder LLMs (causal_lm)', GEN),
    'max_generate_examples': ('decoder LLMs (causal_lm)', GEN),
    'export_max_new_tokens': ('decoder LLMs (causal_lm)', GEN),
    'export_sampler': ('decoder LLMs (causal_lm)', GEN),
    'export_top_k': ('decoder LLMs (causal_lm)', GEN),
    'export_top_p': ('decoder LLMs (causal_lm)', GEN),
    'export_temperature': ('decoder LLMs (causal_lm)', GEN),
    'export_num_beams': ('decoder LLMs (causal_lm)', GEN),
    'export_length_penalty': ('decoder LLMs (causal_lm)', GEN),
    'attention': ('decoder LLMs (causal_lm)', LM),
    'pack_sequences': ('decoder LLMs (causal_lm)', LM),
    'cache_dir': ('decoder LLMs (causal_lm)', ALL),
    'backbone': ('model', ALL),
    'sequence_length': ('model', ALL),
    'pooling': ('classification', CLS),
    'dropout': ('model', ENC),
    'crf': ('token classification', TOK),
    'freeze_layers': ('tuning methods', ALL),
    'lora_rank': ('tuning methods', ALL),
    'lora_alpha': ('tuning methods', ALL),
    'lora_targets': ('tuning methods', ALL),
    'base_quantization': ('tuning methods', ALL),
    'num_prompt_tokens': ('tuning methods', ALL),
    'prefix_length': ('tuning methods', ALL),
    'prefix_projection': ('tuning methods', ALL),
    'epochs': ('optimisation', ALL),
    'batch_size': ('optimisation', ALL),
    'eval_batch_size': ('optimisation', ALL),
    'learning_rate': ('optimisation', ALL),
    'weight_decay': ('optimisation', ALL),
    'warmup_ratio': ('optimisation', ALL),
    'lr_schedule': ('optimisation', ALL),
    'clipnorm': ('optimisation', ALL),
    'class_weights': ('classification', CLS_TOK),
    'early_stopping_patience': ('optimisation', ALL),
    'seed': ('optimisation', ALL),
    'deterministic': ('optimisation', ALL),
    'cache_tokens': ('optimisation', ALL),
    'num_buckets': ('optimisation', ALL),
    'precision': ('optimisation', ALL),
    'jit_compile': ('optimisation', ALL),
    'steps_per_execution': ('optimisation', ALL),
    'gradient_checkpointing': ('optimisation', ALL),
    'checkpoint_every_steps': ('checkpoints and logging', ALL),
    'keep_checkpoints': ('checkpoints and logging', ALL),
    'log_every_steps': ('checkpoints and logging', ALL),
    'strategy': ('distribution', ALL),
    'tpu': ('distribution', ALL),
    'run_name': ('export', ALL),
    'model_dir': ('export', ALL),
    'export_dir': ('export', ALL),
    'export': ('export', ALL),
    'quantize': ('compression', ENC),
    'teacher': ('compression', CLS_TOK),
    'distill_alpha': ('compression', CLS_TOK),
    'distill_temperature': ('compression', CLS_TOK),
    'student_layers': ('compression', ENC),
    'prune_sparsity': ('compression', ENC),
    'prune_end_fraction': ('compression', ENC),
    'drift': ('forgetting', ALL),
    'regularize_to_pretrained': ('forgetting', ALL),
    'l2sp_weight': ('forgetting', ALL),
    'augment': ('augmentation', CLS_TOK),
    'augment_copies': ('augmentation', CLS_TOK),
    'augment_rate': ('augmentation', CLS_TOK),
    'augment_synonyms': ('augmentation', CLS_TOK),
    'serving_sequence_length': ('export', CLS_TOK),
}


def _other_value(field):
    """A value away from the field's default: another choice, or a changed number, text or list."""
    value = config_lib.default(field)
    if field.metadata["choices"]:
        return next(choice for choice in field.metadata["choices"] if choice != value)
    return {"bool": lambda: not value, "int": lambda: value + 1, "float": lambda: value + 0.5,
            "str": lambda: value + "x", "list": lambda: ["x"]}[field.type]()


def test_every_flag_keeps_its_group_and_the_tasks_that_read_it():
    declared = {f.name: (config_lib.group_of(f.name), config_lib.TASK_ONLY.get(f.name))
                for f in config_lib.fields()}
    assert declared == EXPECTED
    assert list(declared) == list(EXPECTED)  # config.json lists the fields in this order


def test_groups_are_listed_in_their_helpfull_order():
    assert list(config_lib.GROUPS) == list(dict.fromkeys(group for group, _ in EXPECTED.values()))
    for group, names in config_lib.GROUPS.items():
        assert names == [name for name, (g, _) in EXPECTED.items() if g == group]


def test_helpfull_lists_each_flag_under_its_group_heading():
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    by_module = {module: sorted(flag.name for flag in defined)
                 for module, defined in fv.flags_by_module_dict().items()}
    assert by_module == {f"kft: {group}": sorted(names) for group, names in config_lib.GROUPS.items()}


def test_flags_name_only_real_tasks():
    task = next(f for f in config_lib.fields() if f.name == "task")
    assert task.metadata["choices"] == TASKS
    for name, tasks in config_lib.TASK_ONLY.items():
        assert tasks and set(tasks) < set(TASKS), name


@pytest.mark.parametrize("name", [name for name, (_, tasks) in EXPECTED.items() if tasks])
def test_a_flag_set_for_a_task_that_does_not_read_it_is_refused(name):
    field = next(f for f in config_lib.fields() if f.name == name)
    value = _other_value(field)
    reading, other = EXPECTED[name][1][0], next(t for t in TASKS if t not in EXPECTED[name][1])
    config_lib.check_task_flags(Config(task=reading, **{name: value}))  # its own task accepts it
    config_lib.check_task_flags(Config(task=other))  # the default is never refused
    with pytest.raises(FlagError, match=f"--{name}.* applies to --task={reading}.*not --task={other}"):
        config_lib.check_task_flags(Config(task=other, **{name: value}))


def test_a_flag_every_task_reads_is_accepted_with_every_task():
    changed = {f.name: _other_value(f) for f in config_lib.fields()
               if f.name != "task" and not EXPECTED[f.name][1]}
    for task in TASKS:
        config_lib.check_task_flags(Config(task=task, **changed))


def test_a_mistyped_flag_or_field_fails():
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    with pytest.raises(flags.UnrecognizedFlagError):
        fv(["prog", "--lora_rnak=4"])
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["prog", "--task=clasification"])
    with pytest.raises(TypeError):
        Config(lora_rnak=4)


def test_keyword_construction_attribute_access_and_copies_work():
    config = Config(task="causal_lm", lora_rank=4)
    assert (config.task, config.lora_rank, config.lora_alpha) == ("causal_lm", 4, 16.0)
    assert config_lib.to_dict(config)["lora_rank"] == 4
    assert list(config_lib.to_dict(config)) == list(EXPECTED)
    assert dataclasses.replace(config, lora_rank=2).lora_rank == 2
    assert Config().lora_targets is not Config().lora_targets  # list defaults are not shared


def test_the_flag_reference_lists_every_flag_by_group():
    text = flag_reference.markdown()
    for group, names in config_lib.GROUPS.items():
        section = text.split(f"\n## {group}\n")[1].split("\n## ")[0]
        assert [line.split("`")[1] for line in section.splitlines() if line.startswith("| `--")] == \
            [f"--{name}" for name in names]
    quantize = next(line for line in text.splitlines() if line.startswith("| `--quantize`"))
    assert "classification, token_classification, question_answering" in quantize and "`int4`" in quantize
    assert "all tasks" in next(line for line in text.splitlines() if line.startswith("| `--lora_rank`"))


def test_docs_flags_md_is_up_to_date_with_the_declarations():
    with open(os.path.join(ROOT, "docs", "flags.md")) as f:
        written = f.read()
    assert written == flag_reference.markdown(), "docs/flags.md is out of date: run `make docs-flags`"
