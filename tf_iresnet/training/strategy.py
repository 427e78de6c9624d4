"""Choosing a `tf.distribute.Strategy` by name, and asking which worker is the chief.

Every binary selects its strategy with one flag (`--strategy`) whose value is passed to
`make_strategy`; nothing else in the project constructs strategies. The names follow the TF
Model Garden: `default`, `one_device`, `mirrored`, `multi_worker_mirrored`, plus `auto`.

`MultiWorkerMirroredStrategy` must be created at the very start of the program, before any
other TensorFlow op runs, because it configures the eager context's collective executor.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

import tensorflow as tf

STRATEGY_NAMES: tuple[str, ...] = (
    "auto",
    "default",
    "one_device",
    "mirrored",
    "multi_worker_mirrored",
)

_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


def parse_tf_config(text: str | None) -> dict[str, Any]:
    """Parses and validates the text of the `TF_CONFIG` environment variable.

    Args:
      text: the JSON text of `TF_CONFIG`, or None when the variable is unset.

    Returns:
      The decoded dict, checked to hold a `cluster` with at least one `worker` or `chief`
      address and a `task` whose `type` is a job of the cluster and whose `index` is in range.

    Raises:
      ValueError: if `text` is None or empty, not JSON, or does not describe a cluster and task
        as above. The message shows an example of a valid value.
    """
    hint = f"Set TF_CONFIG to JSON such as {_TF_CONFIG_EXAMPLE}, one distinct task per process."
    if not text or not text.strip():
        raise ValueError(
            "Strategy 'multi_worker_mirrored' needs the TF_CONFIG environment variable, "
            f"which is not set. {hint}"
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {text!r}. {hint}") from e
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {text!r}. {hint}")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not any(
        isinstance(cluster.get(job), list) and cluster.get(job) for job in ("worker", "chief")
    ):
        raise ValueError(
            f"TF_CONFIG has no 'cluster' with a non-empty 'worker' or 'chief' address list: "
            f"{text!r}. {hint}"
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(
            isinstance(a, str) and ":" in a for a in addresses
        ):
            raise ValueError(
                f"TF_CONFIG cluster job {job!r} must be a list of 'host:port' strings, "
                f"got {addresses!r}. {hint}"
            )
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f"TF_CONFIG has no 'task' with 'type' and 'index': {text!r}. {hint}")
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG task type {task_type!r} is not a job of the cluster "
            f"{sorted(cluster)}: {text!r}. {hint}"
        )
    if (
        not isinstance(index, int)
        or isinstance(index, bool)
        or not (0 <= index < len(cluster[task_type]))
    ):
        raise ValueError(
            f"TF_CONFIG task index {index!r} is out of range for job {task_type!r} with "
            f"{len(cluster[task_type])} address(es): {text!r}. {hint}"
        )
    return config


class WorkerLostError(RuntimeError):
    """A multi-worker run lost a worker: the survivors stop with this (one line that names the
    lost worker and says how to resume) instead of TF's raw collective error."""


# What a surviving worker sees when a peer dies: the collective is aborted (by the coordination
# service's heartbeat, or a reset gRPC connection).
PEER_FAILURE_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                       tf.errors.DeadlineExceededError)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` spans several processes (a `TF_CONFIG` cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return False
    return sum(len(v) for v in resolver.cluster_spec().as_dict().values()) > 1


def lost_worker_error(strategy: tf.distribute.Strategy, error: Exception, *,
                      newest_checkpoint: str | None = None) -> WorkerLostError:
    """The `WorkerLostError` of a collective aborted by ``error`` (one of
    `PEER_FAILURE_ERRORS`) under a multi-worker ``strategy``.

    The lost worker is the peer TF names in ``error`` (``/job:worker/replica:0/task:1``);
    failing that, the peers whose address no longer accepts connections.
    """
    task_type, task_id = task_info(strategy)
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    text = getattr(error, "message", None) or str(error)
    named = []
    for job, index in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text):
        peer = (job, int(index))
        if peer != (task_type, task_id) and job in cluster and peer not in named:
            named.append(peer)
    if not named:
        named = [(job, i) for job, addresses in cluster.items()
                 for i, address in enumerate(addresses)
                 if (job, i) != (task_type, task_id) and not _accepts_connections(address)]
    if named:
        lost = ", ".join(f"{job} {i} ({_address(cluster, job, i)})" for job, i in named)
    else:
        lost = "another worker"
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("Graph execution error")]
    cause = next((line for line in lines if "abort" in line.lower()), lines[0] if lines else "")
    if not is_chief(strategy):
        resume = "from the chief's newest checkpoint"
    elif newest_checkpoint:
        resume = f"from the newest checkpoint ({newest_checkpoint})"
    else:
        resume = "from step 0 (no checkpoint was written yet)"
    return WorkerLostError(
        f"{task_type} {task_id} lost {lost} of the multi-worker cluster and stopped "
        f"({type(error).__name__}: {cause[:200]}). Restart every worker with the same command "
        f"and TF_CONFIG: training resumes {resume}.")


def _address(cluster: dict, job: str, index: int) -> str:
    addresses = cluster.get(job, [])
    return addresses[index] if 0 <= index < len(addresses) else "?"


def _accepts_connections(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


# Keys one strategy may use before the next one's begin (TensorFlow's tests use the same stride).
_COLLECTIVE_KEY_STRIDE = 100_000


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Returns the distribution strategy called `name`.

    Args:
      name: one of `STRATEGY_NAMES`:
        * `auto`: `mirrored` over all GPUs when more than one GPU is visible, else `default`.
        * `default`: the default (no-op) strategy: one replica on the default device.
        * `one_device`: one replica placed explicitly on the first GPU, else on the CPU.
        * `mirrored`: synchronous data parallelism over all local GPUs; on a machine without
          GPUs, over all logical CPU devices (so a CPU split into logical devices, as in the
          tests, gives several replicas), and a single CPU replica otherwise.
        * `multi_worker_mirrored`: synchronous data parallelism over the workers described by
          the `TF_CONFIG` environment variable (validated first; see `parse_tf_config`). Call
          this before any other TensorFlow op.

    Returns:
      The strategy. Build models and optimizers under its `scope()`.

    Raises:
      ValueError: for an unknown `name` (the message lists the choices) or, for
        `multi_worker_mirrored`, a missing or invalid `TF_CONFIG`.
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(
            f"Unknown distribution strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}."
        )
    if name == "multi_worker_mirrored":
        parse_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()

    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return _mirrored([d.name for d in gpus]) if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    # name == "mirrored"
    if gpus:
        return _mirrored([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    return _mirrored([d.name for d in cpus] or ["/cpu:0"])


def _mirrored(devices: list[str]) -> tf.distribute.MirroredStrategy:
    """A `MirroredStrategy` over ``devices`` whose collective keys no earlier one has used.

    The eager context caches collective groups and instances by key for the whole process, and
    every `MirroredStrategy` numbers its keys from the same class-level base. A second strategy
    over the same devices (a second run in one process, the next test) then pairs its first
    all-reduce with the first strategy's and aborts with "Shape mismatch in the collective
    instance ...". Moving the base for each new strategy, as TensorFlow's own strategy tests
    do, keeps every strategy's keys apart.
    """
    tf.distribute.MirroredStrategy._collective_key_base += _COLLECTIVE_KEY_STRIDE
    return tf.distribute.MirroredStrategy(devices)


def task_info(strategy: tf.distribute.Strategy | None = None) -> tuple[str | None, int]:
    """Returns `(task_type, task_id)` of this process in a multi-worker cluster.

    Single-process strategies (and the default one) give `(None, 0)`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process is the chief: the one that writes checkpoints, logs and files.

    True for single-process strategies; under a multi-worker strategy, true for the `chief`
    task, or for worker 0 when the cluster has no `chief` job.
    """
    strategy = strategy or tf.distribute.get_strategy()
    task_type, task_id = task_info(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    cluster_spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster_spec
