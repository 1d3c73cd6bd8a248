"""Running the CLI and scripts in child processes with a hard time limit (a deadlock fails instead of hanging)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: one thread per process (two cores, several processes), no GPU."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def start(
    cmd: list[str], cwd: Path, preexec_fn: Callable[[], None] | None = None, **extra_env: str
) -> subprocess.Popen[str]:
    """Start ``cmd`` in its own process group (so that a kill reaches the DDP ranks it launches too); ``preexec_fn``
    runs in the child before the command (a resource limit, say)."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=child_env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """Wait for ``proc``; past ``timeout`` seconds kill its whole process group and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s (a deadlock?); output:\n{out[-4000:]}") from None
    return proc.returncode, out


def run(cmd: list[str], cwd: Path, timeout: float, **extra_env: str) -> tuple[int, str]:
    """Run ``cmd`` to its end within ``timeout`` seconds: (exit status, stdout and stderr together)."""
    return finish(start(cmd, cwd, **extra_env), timeout)


def train_cmd(*args: str) -> list[str]:
    """The command line of ``python train.py ARGS``."""
    return [sys.executable, str(TRAIN), *args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The paper's ST-CNN (58 K parameters) in place of the demo's resnet10t (4.9 M), for the tests where the network's
#: size does not matter (resume, signals, DDP, predict): the same transformer, a training step several times cheaper.
SMALL = ("--model.backbone", "stn_paper_cnn_st", "--model.backbone_kwargs", "{}")


def demo_fit(*args: str) -> list[str]:
    """The arguments of ``fit`` on configs/demo.yaml on the CPU, small and quiet (16 digits a batch, 2 attention
    images, no progress bar), then ``args``."""
    quiet = ("--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")
    small = ("--data.init_args.batch_size", "16", "--attention.num_images", "2")
    return ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), *quiet, *small, *args]
