"""Files appear whole or not at all; a failed write is one line naming the file and the reason; Ctrl-C saves.

Through the CLI in child processes, each with a hard time limit: a checkpoint write that fails with ENOSPC (a
patched writer) and past a file-size limit (RLIMIT_FSIZE), a predictions path under a regular file, and Ctrl-C
under DDP (Ctrl-C then ``--ckpt_path last`` in one process: tests/test_resume.py).
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from pathlib import Path

from subprocess_helpers import SMALL, demo_fit, finish, run, start, train_cmd

from stn_lightning.checkpointing import find_last_checkpoint, read_checkpoint

FIT = demo_fit("--trainer.devices", "1", "--trainer.deterministic", "true", "--trainer.limit_val_batches", "1")

# The CLI with every file opened by os.fdopen (the atomic writer's temporary files) failing with ENOSPC once
# STN_FAIL_AFTER checkpoints were written whole, after a first megabyte: a disk that fills up during a write.
_NO_SPACE = """
import errno, os, sys
real_fdopen, done = os.fdopen, {"files": 0}
class Full:
    def __init__(self, f): self.f, self.n = f, 0
    def write(self, data):
        self.n += len(data)
        if self.n > 1_000_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
def fdopen(fd, mode="r", *args, **kwargs):
    f = real_fdopen(fd, mode, *args, **kwargs)
    if "b" in mode and "w" in mode:
        done["files"] += 1
        if done["files"] > int(os.environ["STN_FAIL_AFTER"]):
            return Full(f)
    return f
os.fdopen = fdopen
sys.argv = ["train.py", *sys.argv[1:]]
from stn_lightning.cli import console
console()
"""


def _one_error_line(out: str) -> str:
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-3000:]
    return errors[0]


def _no_temporary_files(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if ".tmp" in p.name]
    assert not left, f"temporary files left behind: {left}"


def test_a_checkpoint_write_without_space_stops_training_in_one_line(tmp_path: Path) -> None:
    args = [*FIT, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4"]
    cmd = [sys.executable, "-c", _NO_SPACE, *args, "--checkpoint.last_every_n_steps", "2"]
    code, out = run(cmd, tmp_path, timeout=300, STN_FAIL_AFTER="1")
    line = _one_error_line(out)
    assert code == 2, out[-3000:]
    assert "No space left on device" in line and "training stopped at step 4" in line, line
    named = Path(line.split("cannot write ", 1)[1].split(": ", 1)[0])
    assert named.parent == tmp_path / "lightning_logs" / "version_0" / "checkpoints", line
    last = named.parent / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 2, "the earlier last.ckpt changed"
    assert not named.exists() or named == last
    _no_temporary_files(tmp_path)


def test_a_checkpoint_past_the_file_size_limit_is_one_line_and_no_file(tmp_path: Path) -> None:
    def limit() -> None:  # in the child: files of at most 4 MB (a demo checkpoint is about 20 MB)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000))

    args = [*FIT, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    proc = start(train_cmd(*args), tmp_path, preexec_fn=limit)
    code, out = finish(proc, timeout=300)
    line = _one_error_line(out)
    assert code == 2, out[-3000:]
    assert "File too large" in line and ".ckpt" in line and "training stopped" in line, line
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint past the limit was left"
    _no_temporary_files(tmp_path)


def test_predictions_under_a_regular_file_is_one_line(tmp_path: Path) -> None:
    args = [*FIT, *SMALL, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    code, out = run(train_cmd(*args), tmp_path, 300)
    assert code == 0, out[-3000:]
    last = find_last_checkpoint(tmp_path / "lightning_logs")
    (tmp_path / "a_file").write_text("not a folder\n")
    predict = ["predict", "--ckpt_path", str(last), "--trainer.limit_predict_batches", "1"]
    code, out = run(train_cmd(*predict, "--predictions.output", "a_file/rows.jsonl"), tmp_path, 300)
    line = _one_error_line(out)
    assert code == 2, out[-3000:]
    assert line == "error: cannot write a_file/rows.jsonl: Not a directory (a_file)", line
    assert (tmp_path / "a_file").read_text() == "not a folder\n"


def test_ctrl_c_under_ddp_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    # A terminal's Ctrl-C reaches every process of the group (both ranks), each at its own moment: they agree after
    # a step, stop after the same one, and rank 0 writes one checkpoint and one line.
    args = [*FIT, *SMALL, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1"]
    # 100 steps: the small network could finish 24 between the first checkpoint and the signal.
    args += ["--trainer.limit_train_batches", "100", "--checkpoint.last_every_n_steps", "2"]
    proc = start(train_cmd(*args), tmp_path)
    deadline = time.monotonic() + 300
    while find_last_checkpoint(tmp_path / "lightning_logs") is None:
        assert proc.poll() is None and time.monotonic() < deadline, "no step checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finish(proc, timeout=300)
    assert code == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped by Ctrl-C")]
    assert len(stopped) == 1, out[-3000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["last.ckpt"], checkpoints
    step = read_checkpoint(checkpoints[0])["global_step"]
    assert 2 <= step < 100 and f"at step {step}" in stopped[0], (step, stopped)
    _no_temporary_files(tmp_path)
