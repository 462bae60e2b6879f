"""Where a run stands (`TrainState`), saved with every checkpoint and restored to resume it.

The state is the checkpoint's JSON metadata: the position (step, epoch, batch within the epoch),
the epoch's running loss, the best epoch so far and the early-stopping count, the history and loss
curve, and the flags and learning rate the run was started with, which a resumption must match.
"""

from __future__ import annotations

import dataclasses

from kft.config import Config, FlagError
from kft.training import checkpoints
from kft.training import optim

# Flags read only when the trained model is exported (how the exported decoder generates): a finished
# run is exported again with other values without training again.
EXPORT_ONLY = {"export_max_new_tokens", "export_sampler", "export_top_k", "export_top_p", "export_temperature",
               "export_num_beams", "export_length_penalty"}
# Flags that may differ between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = {"model_dir", "export", "export_dir", "run_name", "strategy", "tpu", "data_dir",
                     "steps_per_execution", "jit_compile", "checkpoint_every_steps",
                     "keep_checkpoints", "log_every_steps", "cache_tokens",
                     "eval_batch_size", "quantize", "serving_sequence_length", "gradient_checkpointing",
                     *EXPORT_ONLY}

# The name checkpoints written before `best_eval_score` gave it (whatever the task's score was).
_LEGACY_BEST = "best_accuracy"


@dataclasses.dataclass
class TrainState:
    """A run's position and records; its fields, in this order, are the checkpoint's state JSON."""

    step: int = 0
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of the current epoch finished
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    # The best epoch-end eval score so far (higher is better) and what it is: "accuracy", or the
    # task's own score ("entity_f1", "f1", "-loss" ...); None before the first epoch-end evaluation.
    best_eval_score: float | None = None
    best_eval_metric: str | None = None
    best_epoch: int = 0
    epochs_without_gain: int = 0
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)  # one dict per finished epoch
    curve_steps: list = dataclasses.field(default_factory=list)
    curve_losses: list = dataclasses.field(default_factory=list)
    window: list = dataclasses.field(default_factory=lambda: [0.0, 0])  # [loss sum, steps] of the curve's window
    config: dict = dataclasses.field(default_factory=dict)  # the flags the run started with
    # the rate trained with: --learning_rate=0 resolves through a table that may change
    learning_rate: float | None = None

    @classmethod
    def fresh(cls, config: Config) -> "TrainState":
        return cls(config=dataclasses.asdict(config), learning_rate=optim.peak_learning_rate(config)[0])

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        """The state a checkpoint holds; reads those written before the best score was renamed."""
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        if _LEGACY_BEST in saved and "best_eval_score" not in saved:
            state.best_eval_score = saved[_LEGACY_BEST]
        return state

    def to_saved(self) -> dict:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str):
        """Read access by field name, as for the dict the state used to be (`state["step"]`)."""
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def record_step(self, loss: float, curve_every: int) -> None:
        """Counts one finished step; the loss curve keeps means over windows of `curve_every`."""
        self.step += 1
        self.batch += 1
        self.epoch_loss_sum += loss
        self.epoch_loss_count += 1
        self.window[0] += loss
        self.window[1] += 1
        if self.step % curve_every == 0:
            self.curve_steps.append(self.step)
            self.curve_losses.append(self.window[0] / self.window[1])
            self.window = [0.0, 0]

    def epoch_loss(self) -> float:
        return self.epoch_loss_sum / max(1, self.epoch_loss_count)

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.batch, self.epoch_loss_sum, self.epoch_loss_count = 0, 0.0, 0

    def save(self, folder: str, model_variables, optimizer_variables, keep: int) -> str:
        """Writes checkpoint `step` of these variables with this state; returns its path."""
        return checkpoints.save(folder, self.step, model_variables, optimizer_variables, self.to_saved(), keep)

    @classmethod
    def restore(cls, ckpt: checkpoints.Checkpoint, config: Config, model_variables,
                optimizer_variables) -> "TrainState":
        """Assigns `ckpt`'s variables and returns its state, once its flags and rate match `config`'s."""
        check_same_run(ckpt.state["config"], config, ckpt.path)
        rate, source = optim.peak_learning_rate(config)
        if ckpt.state.get("learning_rate", rate) != rate:
            then = optim.format_rate(ckpt.state["learning_rate"])
            raise FlagError(f"{ckpt.path} was trained at learning rate {then}, but this run's is "
                            f"{optim.format_rate(rate)} ({source}): kft's default changed since. Give "
                            f"--learning_rate={then} to resume it.")
        checkpoints.restore(ckpt, model_variables, optimizer_variables)
        state = cls.from_saved(ckpt.state)
        if state.learning_rate is None:  # written before the rate was recorded: it matched above
            state.learning_rate = rate
        return state


def check_same_run(saved: dict, config: Config, path: str) -> None:
    """Refuses to resume, from the checkpoint at `path`, a run whose result-changing flags differ."""
    now = dataclasses.asdict(config)
    # A flag added after the checkpoint was written counts as having had its default then.
    defaults = dataclasses.asdict(Config())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"--{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in changed)
        raise FlagError(f"{path} was written by a run with other flags ({detail}). Use the same "
                        "flags to resume, or another --model_dir to start a new run.")
