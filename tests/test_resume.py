"""Runs that survive: SIGKILL or Ctrl-C mid-epoch and ``--ckpt_path last`` give the uninterrupted run; SIGTERM
saves and exits; checkpoint writes are atomic; checkpoints never unpickle arbitrary objects.

The interrupted runs are compared with one uninterrupted run of the same arguments (a module fixture, trained once),
each process with a hard time limit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from subprocess_helpers import ROOT, SMALL, demo_fit, finish, run, start, train_cmd

from stn_lightning.checkpointing import AtomicCheckpointIO, NonFiniteError, find_last_checkpoint, read_checkpoint

# 2 epochs of 24 steps, a step checkpoint every 4: a run interrupted after its first checkpoint is mid-epoch.
ARGS = demo_fit(
    *("--trainer.devices", "1", "--trainer.deterministic", "true", "--trainer.max_epochs", "2"),
    *("--trainer.limit_train_batches", "24", "--trainer.limit_val_batches", "1"),
    *("--checkpoint.last_every_n_steps", "4"),
    *SMALL,
)
STEPS = 48


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The last checkpoint of ARGS run to its end without interruption."""
    folder = tmp_path_factory.mktemp("whole")
    code, out = run(train_cmd(*ARGS), folder, timeout=300)
    assert code == 0, out[-3000:]
    return read_checkpoint(folder / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")


def _wait_for_checkpoint(folder: Path, proc, timeout: float = 240) -> Path:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while (found := find_last_checkpoint(folder / "lightning_logs")) is None:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {proc.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.02)
    return found


def _resume_matches(folder: Path, reference: dict) -> float:
    """Resume the interrupted run in ``folder`` with ``--ckpt_path last`` to its end; the largest weight difference
    from the uninterrupted run's (which must have ended at the same epoch and step)."""
    code, out = run(train_cmd(*ARGS, "--ckpt_path", "last"), folder, timeout=300)
    assert code == 0, out[-3000:]
    assert "not resumable" not in out and "unreliable" not in out, out[-3000:]
    resumed = read_checkpoint(folder / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")
    assert (reference["epoch"], reference["global_step"]) == (resumed["epoch"], resumed["global_step"]) == (1, STEPS)
    ref = reference["state_dict"]
    return max((ref[k].double() - v.double()).abs().max().item() for k, v in resumed["state_dict"].items())


def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path: Path, uninterrupted: dict) -> None:
    proc = start(train_cmd(*ARGS), tmp_path)
    first = _wait_for_checkpoint(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # wherever the run is: in a step, or writing the next checkpoint
    proc.communicate()
    killed_at = read_checkpoint(find_last_checkpoint(tmp_path / "lightning_logs"))["global_step"]
    assert 4 <= killed_at < 24, f"not killed inside the first epoch (last checkpoint at step {killed_at})"
    diff = _resume_matches(tmp_path, uninterrupted)
    print(f"killed after step {killed_at} ({first.name}), resumed to {STEPS}: max weight difference {diff:.3g}")
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff}"


def test_ctrl_c_in_the_first_epoch_then_resume_reaches_the_uninterrupted_weights(
    tmp_path: Path, uninterrupted: dict
) -> None:
    proc = start(train_cmd(*ARGS), tmp_path)
    _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc, timeout=300)
    assert code == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped by Ctrl-C")]
    assert len(stopped) == 1 and "--ckpt_path last" in stopped[0], out[-3000:]
    last = find_last_checkpoint(tmp_path / "lightning_logs")
    assert last is not None and str(last) in stopped[0]
    step = read_checkpoint(last)["global_step"]
    assert 4 <= step < 24 and f"at step {step}" in stopped[0], (step, stopped)
    diff = _resume_matches(tmp_path, uninterrupted)
    print(f"Ctrl-C after step {step}, resumed to {STEPS}: max weight difference {diff:.3g}")
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff}"


def test_sigterm_saves_the_state_and_exits(tmp_path: Path) -> None:
    # 10 epochs: far more than the second this test waits, on any CPU.
    proc = start(train_cmd(*ARGS, "--trainer.max_epochs", "10"), tmp_path)
    first = _wait_for_checkpoint(tmp_path, proc)
    step_before = read_checkpoint(first)["global_step"]
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=120)
    assert code == 143, out[-3000:]
    assert "SIGTERM" in out and "--ckpt_path last" in out
    saved = read_checkpoint(first)
    assert saved["global_step"] > step_before, "SIGTERM did not save the state it stopped at"


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "epoch": 1}
    io.save_checkpoint(good, path)

    def dies_half_way(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"
    with pytest.raises(NonFiniteError, match="w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert read_checkpoint(path)["epoch"] == 1
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user writes, not mkstemp's 0600


class _Marker:
    """Unpickling this object would create a file: what a malicious checkpoint does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def test_a_malicious_checkpoint_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Marker(marker)}}, evil)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        read_checkpoint(evil)
    with pytest.raises(Exception):  # noqa: B017 - torch's own weights-only error
        AtomicCheckpointIO().load_checkpoint(evil)
    code, out = run(
        train_cmd("test", "--config", str(ROOT / "configs" / "demo.yaml"), "--ckpt_path", str(evil)), tmp_path, 120
    )
    assert code == 2 and "refuses to unpickle" in out and "Traceback" not in out, out[-2000:]
    assert not marker.exists()


def test_last_checkpoint_every_n_steps_and_at_every_epoch_end(tmp_path: Path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from stn_lightning.checkpointing import STNCheckpoint
    from stn_lightning.module import STNModule

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(28, 1, 28, 28, generator=g), torch.randint(0, 10, (28,), generator=g))
    ckpt = STNCheckpoint(dirpath=tmp_path, save_last=True, last_every_n_steps=3)
    written: list[int] = []
    save_last = ckpt._save_last_checkpoint

    def recording(trainer: pl.Trainer, candidates: dict) -> None:
        written.append(trainer.global_step)
        save_last(trainer, candidates)

    ckpt._save_last_checkpoint = recording  # type: ignore[method-assign]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(STNModule(backbone="resnet10t", image_size=28), DataLoader(data, batch_size=4))
    assert written == [3, 6, 7, 9, 12, 14]  # every 3 steps and each epoch's end (7 steps an epoch)
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 14
    assert sorted(p.name for p in tmp_path.glob("epoch=*.ckpt")) == ["epoch=1-step=14.ckpt"]  # top-k still saved


def test_resuming_across_a_changed_localisation_optimiser_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A checkpoint of one optimiser (localization.optimizer null) resumed under the default (an Adam localiser) would
    # fail deep in load_state_dict; the checkpoint's hyperparameters now carry the option, so resuming takes it.
    from stn_lightning.cli import main

    args = [
        "--config", str(ROOT / "configs" / "rts_mnist.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--attention.every_n_epochs", "1000", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1",
    ]  # fmt: skip
    main(["fit", *args, "--trainer.max_epochs", "1", "--model.localization.optimizer", "null"])
    last = next(tmp_path.rglob("last.ckpt"))
    # The checkpoint's hyperparameters hold the localisation options: resuming takes them, and says so.
    cli = main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    assert cli.model.localization.optimizer is None
    main(["test", *args, "--ckpt_path", str(last)])
