"""Two-worker runs of the density binary on 127.0.0.1, for the multi-worker tests."""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny 2-D run; the caller adds --train_steps and anything else.
TOY_ARGS = ("--dataset=moons", "--preset=toy2d_density", "--export_dir=", "--batch_size=16",
            "--eval_every=0", "--checkpoint_every=2", "--nojit_compile",
            "--strategy=multi_worker_mirrored", "--eval_examples=32", "--log_every=1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(model_dir, args, log_dir, tag, ports=None):
    """Starts worker 0 (the chief) and worker 1 of `python -m train.density *TOY_ARGS *args`
    on one `model_dir`, as on a shared file system (every worker restores from it). Their
    output goes to `log_dir/<tag>_{out,err}<index>`. Returns (processes, ports)."""
    ports = ports or [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=REPO)
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "train.density", *TOY_ARGS, f"--model_dir={model_dir}",
             *args],
            cwd=REPO, env=dict(env, TF_CONFIG=tf_config),
            stdout=open(os.path.join(log_dir, f"{tag}_out{index}"), "w"),
            stderr=open(os.path.join(log_dir, f"{tag}_err{index}"), "w")))
    return procs, ports
