"""Choosing a tf.distribute strategy from --strategy / --tpu."""

from __future__ import annotations

import dataclasses

import tensorflow as tf
from absl import logging

from kft.config import FlagError


_CREATED: dict = {}


def get_strategy(name: str = "auto", tpu: str = "") -> tf.distribute.Strategy:
    """Builds the strategy; model creation and compile must happen under its scope().

    auto: TPU if --tpu is given, MirroredStrategy over several GPUs, else one device (GPU or CPU).
    """
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        if tpu:
            name = "tpu"
        elif len(gpus) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "tpu":
        if not tpu:
            raise FlagError("--strategy=tpu needs --tpu (a TPU name, 'local', or grpc:// address)")
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    elif name == "cpu":
        strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    elif name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    elif name == "mirrored":
        # Without GPUs, mirror over the logical CPU devices (several when the process configured
        # them, e.g. to test data-parallel training on a CPU machine).
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif name == "multi_worker_mirrored":
        # One per process: it configures the collective ops of the process's TF context.
        if "multi_worker" not in _CREATED:
            _CREATED["multi_worker"] = tf.distribute.MultiWorkerMirroredStrategy()
        strategy = _CREATED["multi_worker"]
    else:
        raise FlagError(f"unknown --strategy={name}; use auto, cpu, one_device, mirrored, "
                         "multi_worker_mirrored or tpu")
    logging.info("devices: %s; strategy: %s with %d replica(s)", describe_devices(), type(strategy).__name__,
                 strategy.num_replicas_in_sync)
    return strategy


def describe_devices() -> str:
    """'1 CPU, no GPU/TPU', '1 CPU, 2 GPU, no TPU': what TensorFlow found, in one phrase."""
    found = {kind: len(tf.config.list_physical_devices(kind)) for kind in ("CPU", "GPU")}
    found["TPU"] = len(tf.config.list_logical_devices("TPU"))  # visible once a TPU system is initialised
    text = ", ".join(f"{n} {kind}" for kind, n in found.items() if n)
    missing = [kind for kind, n in found.items() if not n]
    return text + (f", no {'/'.join(missing)}" if missing else "")


def uses_static_shapes(strategy: tf.distribute.Strategy) -> bool:
    """TPUs compile one program per input shape: feed them fixed bucket shapes."""
    return isinstance(strategy, tf.distribute.TPUStrategy)


@dataclasses.dataclass
class Worker:
    index: int  # 0 for the chief
    count: int
    is_chief: bool


def worker_info(strategy: tf.distribute.Strategy) -> Worker:
    """This process's place among the workers: only the chief writes checkpoints and outputs."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return Worker(0, 1, True)
    spec = resolver.cluster_spec().as_dict()
    count = sum(len(spec.get(job, [])) for job in ("chief", "worker"))
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    # With a "chief" job the chief is task chief:0; without one, worker 0 plays that role.
    if "chief" in spec:
        index = 0 if task_type == "chief" else task_id + 1
    else:
        index = task_id
    return Worker(index, max(count, 1), index == 0)
