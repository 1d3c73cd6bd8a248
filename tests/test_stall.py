"""StallDetector: a run that learns nothing stops after its first judged epoch and says so; one that learns goes on."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from stn_lightning import cli as cli_module
from stn_lightning import runs
from stn_lightning.callbacks import StallDetector, chance_accuracy, chance_loss, is_stalled, stall_message
from stn_lightning.data import MNISTDataModule
from stn_lightning.module import STNModule

LOG10 = math.log(10)


def test_chance_levels() -> None:
    assert chance_loss([5] * 10) == pytest.approx(LOG10) and chance_accuracy([5] * 10) == pytest.approx(0.1)
    # Skewed labels (the sum of two digits is 9 most often): chance is the labels' entropy, below log(C).
    sums = [min(s, 18 - s) + 1 for s in range(19)]
    assert chance_loss(sums) < math.log(19) and chance_accuracy(sums) == pytest.approx(10 / 100)
    assert chance_loss([0, 7, 0]) == 0.0 and chance_accuracy([]) == 0.0


def test_the_decision() -> None:
    assert is_stalled(2.30, LOG10, 0.10, 0.10)
    assert is_stalled(2.30, LOG10, 0.114, 0.10)  # within 1.5 points of chance
    assert not is_stalled(2.30, LOG10, 0.12, 0.10)  # the network does better than chance on validation
    assert not is_stalled(2.20, LOG10, 0.10, 0.10)  # the loss fell below 0.97 log 10 = 2.233
    assert is_stalled(2.30, LOG10, None, None)  # not validated: the loss decides
    assert not is_stalled(float("nan"), LOG10, 0.10, 0.10)  # a non-finite loss is another failure
    assert is_stalled(2.20, LOG10, 0.10, 0.10, loss_ratio=0.9) and not is_stalled(2.30, LOG10, 0.2, 0.1, 0.97, 0.05)


class _Trainer(SimpleNamespace):
    """The parts of a Trainer the detector reads."""

    def __init__(self, **kwargs: Any) -> None:
        defaults: dict[str, Any] = {
            "fast_dev_run": False,
            "sanity_checking": False,
            "callback_metrics": {},
            "global_step": 0,
            "current_epoch": 0,
            "should_stop": False,
            "is_global_zero": True,
            "logger": None,
            "strategy": SimpleNamespace(reduce=lambda tensor, reduce_op: tensor),
            "datamodule": SimpleNamespace(num_classes=10),
        }
        super().__init__(**{**defaults, **kwargs})


def _epoch(detector: StallDetector, trainer: _Trainer, loss: float, val_acc: float | None, steps: int = 10) -> None:
    """One epoch of ``steps`` batches of balanced labels with loss ``loss``, validated at ``val_acc``."""
    module = SimpleNamespace(hparams={})
    labels = torch.arange(10)
    detector.on_train_epoch_start(trainer, module)  # type: ignore[arg-type]
    for i in range(steps):
        batch = (torch.zeros(10, 1, 4, 4), labels)
        detector.on_train_batch_end(trainer, module, {"loss": torch.tensor(loss)}, batch, i)  # type: ignore[arg-type]
        trainer.global_step += 1
    if val_acc is not None:
        detector.on_validation_epoch_start(trainer, module)  # type: ignore[arg-type]
        detector.on_validation_batch_end(trainer, module, None, (torch.zeros(10, 1, 4, 4), labels), 0)  # type: ignore[arg-type]
        trainer.callback_metrics = {"val/acc": torch.tensor(val_acc)}
        detector.on_validation_end(trainer, module)  # type: ignore[arg-type]
    detector.on_train_epoch_end(trainer, module)  # type: ignore[arg-type]
    trainer.current_epoch += 1


def _fit_start(detector: StallDetector, trainer: _Trainer) -> None:
    detector.on_fit_start(trainer, SimpleNamespace(hparams={"num_classes": 10}))  # type: ignore[arg-type]


def test_the_callback_judges_each_epoch() -> None:
    trainer = _Trainer()
    detector = StallDetector(min_steps=0)
    _fit_start(detector, trainer)
    _epoch(detector, trainer, loss=1.2, val_acc=0.10)  # the loss fell: learning
    _epoch(detector, trainer, loss=2.31, val_acc=0.55)  # validation says it learnt
    assert not trainer.should_stop and not detector.stalled
    _epoch(detector, trainer, loss=2.31, val_acc=0.105)
    assert trainer.should_stop and detector.stalled and stall_message(SimpleNamespace(callbacks=[detector]))
    assert detector.message is not None and detector.message.startswith(
        "training loss 2.310 after epoch 2 is at chance (log 10 = 2.303) and validation accuracy 10.5 % no better "
        "than chance (10.0 %, always answering the likeliest class): the network learns nothing"
    )
    assert "lower learning rate" in detector.message and "another seed" in detector.message


def test_patience_steps_and_switches() -> None:
    trainer = _Trainer()
    patient = StallDetector(min_steps=25, patience_epochs=2)
    _fit_start(patient, trainer)
    for _ in range(3):
        _epoch(patient, trainer, loss=2.31, val_acc=0.1)
    # Epoch 0 (10 steps) and 1 (20) come before min_steps; epoch 2 is the first judged; patience asks for two.
    assert not trainer.should_stop
    _epoch(patient, trainer, loss=2.31, val_acc=None)  # no validation this epoch: the last accuracy stands
    assert trainer.should_stop and patient.message is not None and "after epochs 2 to 3" in patient.message
    switched_off = [
        (StallDetector(enabled=False, min_steps=0), _Trainer()),
        (StallDetector(min_steps=0), _Trainer(fast_dev_run=True)),
        (StallDetector(min_steps=0), _Trainer(datamodule=None)),  # no num_classes anywhere: nothing to compare
    ]
    for detector, trainer in switched_off:
        detector.on_fit_start(trainer, SimpleNamespace(hparams={}))  # type: ignore[arg-type]
        _epoch(detector, trainer, loss=2.31, val_acc=0.1)
        assert not trainer.should_stop and not detector.stalled
    with pytest.raises(ValueError, match="patience_epochs >= 1"):
        StallDetector(patience_epochs=0)


class _BlankMNIST(MNISTDataModule):
    """Every image empty: nothing to learn from."""

    def render(self, digits: Tensor, params: dict[str, Tensor]) -> Tensor:
        return torch.zeros_like(digits[:, :1])


def test_a_run_on_blank_images_stops_after_its_first_epoch(
    capsys: pytest.CaptureFixture[str], quiet_trainer: Callable[..., pl.Trainer]
) -> None:
    pl.seed_everything(0)
    data = _BlankMNIST(batch_size=32, val_size=64)
    model = STNModule(backbone="stn_paper_cnn", background=data.background)
    detector = StallDetector(min_steps=0)
    trainer = quiet_trainer(
        max_epochs=3, limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[detector]
    )
    trainer.fit(model, datamodule=data)
    assert trainer.current_epoch == 1  # stopped after epoch 0 of 3
    assert detector.message is not None and "after epoch 0 is at chance" in detector.message
    assert "validation accuracy" in detector.message
    assert f"StallDetector: {detector.message}" in capsys.readouterr().err


def test_the_cli_reports_a_stalled_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    detector = StallDetector()
    detector.message = "training loss 2.303 after epoch 0 is at chance"
    trainer = SimpleNamespace(callbacks=[detector])
    trainer.checkpoint_callback = None
    text = runs.summary(trainer, "logs", validated=True, results=[{"test/acc": 0.1}])  # type: ignore[arg-type]
    assert "stalled:       training loss 2.303 after epoch 0 is at chance" in text
    monkeypatch.setattr(cli_module, "main", lambda: SimpleNamespace(trainer=trainer))
    with pytest.raises(SystemExit) as info:
        cli_module.console()
    assert info.value.code == 1
    detector.message = None
    cli_module.console()  # a run that learnt exits normally


def test_the_cli_registers_the_detector(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    args = ["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]
    cli = cli_module.main([*args, "--stall.patience_epochs", "2", "--stall.min_steps", "7"], run=False)
    (detector,) = [c for c in cli.trainer.callbacks if isinstance(c, StallDetector)]  # type: ignore[attr-defined]
    assert (detector.enabled, detector.patience_epochs, detector.min_steps) == (True, 2, 7)


def test_tasks_without_one_class_per_image_are_not_judged() -> None:
    # A digit string's loss sums several cross-entropies: log C is not its chance level.
    from stn_lightning.module import STNModule
    from stn_lightning.tasks import SequenceReading

    detector = StallDetector(min_steps=0)
    module = STNModule(image_size=32, backbone="stn_sequence_cnn", fusion="none", task=SequenceReading(3))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    detector.on_fit_start(trainer, module)
    assert not detector._active(trainer)
