"""One row of the memory benchmark, in its own process: kft's LoRA training step or the Hugging Face
Trainer + PEFT on training rows of one fixed shape, with the process's resident memory while loading,
once ready and while training, and the time of each step."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from kft.benchmarks.memory_models import Combo
from kft.data import IGNORE

HF_IGNORE = -100  # the Hugging Face label of an untrained position


# -- batches of one fixed shape ----------------------------------------------------------------------

@dataclasses.dataclass
class Rows:
    """Training rows cut or padded to exactly `length` tokens."""

    ids: np.ndarray  # [n, length] int32
    lengths: np.ndarray  # [n] real (non-pad) tokens of each row
    starts: np.ndarray  # [n] tokens before the first trained target (its prompt, bos included)

    def kft_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels [n, length] as kft trains them: position t holds the token at t + 1 where that token
        is trained, IGNORE elsewhere; trained positions per row [n])."""
        labels = np.full(self.ids.shape, IGNORE, np.int32)
        for i, (n, start) in enumerate(zip(self.lengths, self.starts)):
            first = max(int(start) - 1, 0)
            labels[i, first:n - 1] = self.ids[i, first + 1:n]
        return labels, (labels != IGNORE).sum(axis=1)

    def hf_labels(self) -> np.ndarray:
        """Labels as the Hugging Face models take them (shifted inside the model): the same targets."""
        labels = np.full(self.ids.shape, HF_IGNORE, np.int64)
        for i, (n, start) in enumerate(zip(self.lengths, self.starts)):
            first = max(int(start), 1)
            labels[i, first:n] = self.ids[i, first:n]
        return labels

    def padding_mask(self) -> np.ndarray:
        return (np.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]).astype(np.int32)


def fixed_rows(sequences: list, starts, length: int, pad_id: int) -> Rows:
    """Each token sequence cut to its first `length` tokens or padded with `pad_id` to exactly `length`."""
    ids = np.full((len(sequences), length), pad_id, np.int32)
    lengths = np.zeros(len(sequences), np.int64)
    for i, seq in enumerate(sequences):
        seq = np.asarray(seq, np.int32)[:length]
        ids[i, :len(seq)] = seq
        lengths[i] = len(seq)
    starts = np.minimum(np.asarray(starts, np.int64), lengths)
    return Rows(ids, lengths, starts)


def save_rows(rows: Rows, path: str) -> str:
    np.savez(path, ids=rows.ids, lengths=rows.lengths, starts=rows.starts)
    return path


def load_rows(path: str) -> Rows:
    with np.load(path) as f:
        return Rows(f["ids"], f["lengths"], f["starts"])


def dialogsum_rows(config, folder: str, batch: int, tokens: int, steps: int) -> Rows:
    """`batch * steps` DialogSum training examples rendered and tokenized as kft trains them ([bos]
    prompt completion eos through the checkpoint's chat template, prompts cut from their start to
    fit), then padded to exactly `tokens`."""
    from kft.models import backbones
    from kft.tasks.causal_lm import inputs as lm_inputs, task as lm_task

    needed = batch * steps
    config = dataclasses.replace(config, max_train_examples=needed, sequence_length=tokens, backbone=folder)
    data = lm_task.load_data(config)
    if len(data.train) < needed:
        raise ValueError(f"{config.train_file}: {len(data.train)} training examples, {needed} needed")
    loaded = backbones.load_decoder(folder, config.cache_dir, load_weights=False)
    template = lm_task._chat_template(config, loaded, data.train)
    encoded = lm_inputs.encode(data.train, loaded, template, tokens, False, None, None, False)
    return fixed_rows(encoded.ids[:needed], encoded.prompt_lengths[:needed], tokens, loaded.pad_id)


# -- resident memory ---------------------------------------------------------------------------------

def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident memory now (Linux /proc; the peak so far elsewhere)."""
    found = _status_bytes("VmRSS")
    if found is None:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return found


def peak_rss() -> int:
    """Peak resident memory since the process started or since the last `reset_peak`."""
    found = _status_bytes("VmHWM")
    if found is None:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return found


def reset_peak() -> bool:
    """Restarts the peak at the current resident memory (Linux: clear_refs 5), so that a later phase's
    peak is its own; False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Peak memory of loading, memory held once ready, peak of training, for one row's process."""

    def __init__(self):
        self.values = {"start_rss": current_rss()}

    def loaded(self) -> None:
        import gc

        self.values["load_peak"] = peak_rss()
        gc.collect()
        self.values["ready_rss"] = current_rss()
        self.values["peak_reset"] = reset_peak()

    def trained(self) -> dict:
        v = self.values
        v["train_peak"] = peak_rss() if v["peak_reset"] else max(peak_rss(), v["ready_rss"])
        v["peak"] = max(v["load_peak"], v["train_peak"])
        return dict(v)


def step_summary(seconds: list[float], rows: Rows, batch: int) -> dict:
    """Seconds per step after the first (traced) one, and real tokens per second of those steps."""
    timed = seconds[1:]
    per_step = float(np.mean(timed)) if timed else float("nan")
    real = rows.lengths[batch:batch * len(seconds)].sum() / max(1, len(timed))
    return {"step_seconds": [round(s, 3) for s in seconds], "first_step_seconds": round(seconds[0], 3),
            "seconds_per_step": per_step, "real_tokens_per_step": float(real),
            "real_tokens_per_second": float(real) / per_step if timed else None}


# -- the rows (each in its own process: --mode=row --row=memory_kft|memory_hf) -----------------------

def kft_row(config, combo: Combo, rows: Rows, steps: int) -> dict:
    """kft's LoRA training step (the model, method, attention and optimizer `kft.train` builds for
    these flags) on `steps` batches of the fixed rows, one step per call."""
    import tempfile

    import keras
    import tensorflow as tf

    import kft.tasks  # noqa: F401  (registers the tasks the assembly looks up)
    from kft.data import inputs
    from kft.training import assembly, distribute, validation
    from kft.training import loop as loop_lib

    phases = Phases()
    batch, tokens = rows.ids.shape[0] // steps, rows.ids.shape[1]
    # the data flags only feed the assembly; the steps read the fixed rows
    config = dataclasses.replace(config, max_train_examples=batch, max_eval_examples=batch, sequence_length=tokens,
                                 drift=False, cache_tokens=False, export=False, max_new_tokens=0,
                                 checkpoint_every_steps=0, batch_size=batch)
    validation.check_flags(config)
    keras.mixed_precision.set_global_policy(config.precision)
    keras.utils.set_random_seed(config.seed)
    strategy = distribute.get_strategy(config.strategy, config.tpu)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as model_dir:
        a = assembly.assemble(config, model_dir, strategy, True)
    load_seconds = time.time() - t0
    phases.loaded()
    labels, sizes = rows.kft_labels()
    feed = loop_lib.Feed(tf.constant(rows.ids), rows.lengths, labels, np.ones(len(rows.lengths), np.float32),
                         sizes)
    plan = inputs.BatchPlan(np.arange(batch * steps, dtype=np.int32).reshape(steps, batch),
                            np.full(steps, tokens, np.int32))
    iterator = iter(loop_lib.distributed_dataset(strategy, plan, feed))
    seconds, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(float(a.loop.steps.train_chunk(iterator, tf.constant(1)).numpy()[0]))
        seconds.append(time.perf_counter() - t)
    trainable = int(sum(np.prod(v.shape) for v in a.model.trainable_variables))
    return {"framework": "kft", "load_seconds": load_seconds, "losses": losses, "trainable_parameters": trainable,
            "method": a.method_info, "projected_positions": int(sizes[:batch * steps].sum()) / steps,
            **step_summary(seconds, rows, batch), "memory": phases.trained(),
            "software": {"tensorflow": tf.__version__, "keras": keras.__version__}}


HF_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_row(config, combo: Combo, folder: str, rows: Rows, steps: int) -> dict:
    """The Hugging Face Trainer with PEFT LoRA on kft's targets (all seven projections), float32, SDPA
    attention, on the same fixed rows; with the Trainer's gradient checkpointing for `-ckpt`.
    TensorFlow is never imported in this process."""
    import tempfile

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    phases = Phases()
    batch = rows.ids.shape[0] // steps
    torch.set_num_threads(os.cpu_count() or 1)
    transformers.set_seed(config.seed)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                             target_modules=HF_LORA_MODULES, bias="none", task_type="CAUSAL_LM"))
    load_seconds = time.time() - t0
    phases.loaded()
    labels, mask = rows.hf_labels(), rows.padding_mask()
    dataset = [{"input_ids": torch.as_tensor(rows.ids[i], dtype=torch.long),
                "attention_mask": torch.as_tensor(mask[i], dtype=torch.long),
                "labels": torch.as_tensor(labels[i])} for i in range(batch * steps)]
    seconds: list[float] = []

    class Times(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                                 learning_rate=config.learning_rate or 2e-4, lr_scheduler_type="constant",
                                 gradient_checkpointing=combo.checkpointing,
                                 gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True,
                                 save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10 ** 6,
                                 disable_tqdm=True, seed=config.seed, dataloader_drop_last=True)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Times()])
        trainer.train()
    trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return {"framework": "hf", "load_seconds": load_seconds, "trainable_parameters": trainable,
            "projected_positions": float(batch * rows.ids.shape[1]), **step_summary(seconds, rows, batch),
            "memory": phases.trained(),
            "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "torch_threads": torch.get_num_threads()}}
