"""The flag checks a run makes before it reads data, loads a backbone or takes a step.

Everything here reads only the Config (and, for --teacher, the teacher's metrics.json), so a
refused flag combination costs a fraction of a second instead of a backbone load and a
tokenization pass. Checks that need the built model (a method the backbone cannot take, a student
deeper than its source, a teacher with other labels) stay where that model is built.
"""

from __future__ import annotations

from kft import config as config_lib
from kft.compression import distillation, pruning
from kft.config import Config, FlagError
from kft.methods import quantized_base
from kft.training import loop as loop_lib
from kft.training import optim
from kft.training import runs


def check_flags(config: Config) -> None:
    """Refuses a flag combination that cannot work; needs no strategy, data or backbone."""
    config_lib.check_task_flags(config)  # a flag of another task: a mistyped run fails at once
    optim.peak_learning_rate(config)  # refuses a negative (or NaN) --learning_rate
    distillation.check_flags(config)
    quantized_base.check(config)  # --base_quantization with a method that trains the projections
    if config.teacher and config.student_layers:
        _check_student_of_teacher(config)
    _check_regularization(config)
    _check_pruning(config)


def check_replicas(config: Config, replicas: int) -> None:
    """The global batches must split evenly over the strategy's replicas (known once it exists)."""
    if loop_lib.eval_batch_size(config) % replicas:
        raise FlagError(f"--eval_batch_size={loop_lib.eval_batch_size(config)} must divide evenly over "
                        f"{replicas} replicas")
    if config.batch_size % replicas:
        raise FlagError(f"--batch_size={config.batch_size} is the global batch and must divide evenly "
                        f"over {replicas} replicas")


def _check_student_of_teacher(config: Config) -> None:
    """A student copies the teacher's blocks: from the teacher's recorded flags, before loading it."""
    teacher, _ = runs.read_config(config.teacher, "--teacher")
    if config.backbone not in (config_lib.BUNDLED_BACKBONE, teacher.backbone):
        raise FlagError(f"--student_layers with --teacher copies the teacher's backbone "
                        f"({teacher.backbone}); --backbone={config.backbone} contradicts it")
    if teacher.method in ("prompt", "prefix"):
        raise FlagError(f"--student_layers: the teacher was trained with --method="
                        f"{teacher.method}, whose blocks cannot be copied one by one")


def _check_regularization(config: Config) -> None:
    if config.regularize_to_pretrained != "l2sp" and config.l2sp_weight != config_lib.Config().l2sp_weight:
        raise FlagError("--l2sp_weight applies with --regularize_to_pretrained=l2sp only")


def _check_pruning(config: Config) -> None:
    if config.prune_sparsity:
        if config.method != "full":
            raise FlagError(f"--prune_sparsity prunes the kernels as they train: it needs --method=full, "
                            f"not --method={config.method}")
        pruning.check_fractions(config.prune_sparsity, config.prune_end_fraction)
    elif config.prune_end_fraction != config_lib.Config().prune_end_fraction:
        raise FlagError("--prune_end_fraction applies with --prune_sparsity only")
