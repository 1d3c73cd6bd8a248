"""One NaN pixel, a non-finite loss or a non-finite gradient stops the run (or skips the step), never silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from stn_lightning.checkpointing import NonFiniteError, nonfinite_entries
from stn_lightning.cli import main
from stn_lightning.module import STNModule

ROOT = Path(__file__).resolve().parents[1]


def _loader(bad_batch: int | None, batches: int = 4, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch, 1, 28, 28, generator=g)
    if bad_batch is not None:
        x[bad_batch * batch + 3, 0, 5, 7] = float("nan")
    y = torch.randint(0, 10, (batches * batch,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _trainer(**kwargs: Any) -> pl.Trainer:
    options = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return pl.Trainer(**{**options, "enable_model_summary": False, **kwargs})


def _fit(model: STNModule, loader: DataLoader, **kwargs: Any) -> pl.Trainer:
    trainer = _trainer(**kwargs)
    trainer.fit(model, train_dataloaders=loader)
    return trainer


def _model(**kwargs: object) -> STNModule:
    return STNModule(backbone="resnet10t", image_size=28, **kwargs)  # type: ignore[arg-type]


def test_a_nan_pixel_stops_the_run_at_its_batch() -> None:
    model = _model()
    with pytest.raises(NonFiniteError, match=r"batch 2: 1 NaN or inf pixels in 1 of 8 images at global step 2"):
        _fit(model, _loader(bad_batch=2))
    assert not nonfinite_entries(model.state_dict())


def test_a_nan_pixel_is_skipped_and_counted_by_option() -> None:
    model = _model(nonfinite="skip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.warns(UserWarning, match="skipping this step"):
        trainer.fit(model, train_dataloaders=_loader(bad_batch=0, batches=1))
    # The skipped step changed no weight (no gradient, no decay, no momentum); BatchNorm saw the cleaned batch.
    after = model.state_dict()
    changed = [
        k for k, v in before.items() if v.is_floating_point() and "running" not in k and not torch.equal(v, after[k])
    ]
    assert changed == []
    with pytest.warns(UserWarning, match="skipping this step"):
        trainer = _fit(model, _loader(bad_batch=1))
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    assert not nonfinite_entries(model.state_dict())


def test_a_diverging_run_stops_with_the_step_and_writes_no_nan_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.accelerator", "cpu"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "2"]
    args += [
        "--trainer.limit_train_batches",
        "6",
        "--trainer.limit_val_batches",
        "1",
        "--data.init_args.batch_size",
        "8",
    ]
    args += ["--model.optimizer.init_args.lr", "1e6", "--trainer.enable_progress_bar", "false"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert "non-finite" in err and "at global step" in err and "Traceback" not in err
    for ckpt in tmp_path.rglob("*.ckpt"):
        assert not nonfinite_entries(torch.load(ckpt, weights_only=True)["state_dict"]), ckpt


def test_a_nan_gradient_names_the_weights() -> None:
    model = _model()

    def poisoned_backward() -> None:
        for name, p in model.named_parameters():
            if p.grad is not None and name.startswith("model.transformer.head"):
                p.grad[0] = float("inf")

    model.on_after_backward = (lambda original: lambda: (poisoned_backward(), original())[1])(model.on_after_backward)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient in model\.transformer\.head\.weight"):
        _fit(model, _loader(bad_batch=None))


def test_a_default_training_step_reads_nothing_back_from_the_device() -> None:
    # Device-to-host reads (.item(), bool(t), float(t), .tolist(), .cpu()) made by the module's own code during the
    # training steps; the flags are read once, at the end of the epoch (the loader's 4 batches < log_every_n_steps).
    # (The sampler's torch path and Lightning's progress bar read values of their own; they are not counted here.)
    import traceback

    from torch.overrides import TorchFunctionMode

    reads: list[str] = []

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if getattr(func, "__name__", "") in {"item", "__bool__", "__float__", "__int__", "tolist", "cpu"}:
                caller = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-1]
                if caller.filename.endswith(("stn_lightning/module.py", "stn_lightning/nonfinite.py")):
                    reads.append(f"{func.__name__} at {caller.filename}:{caller.lineno}")
            return func(*args, **(kwargs or {}))

    class Window(pl.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            self.mode = Reads()
            self.mode.__enter__()

        def on_train_batch_end(self, *args: object) -> None:
            self.mode.__exit__(None, None, None)

    _fit(_model(), _loader(bad_batch=None), callbacks=[Window()])
    assert reads == []


def test_a_nan_pixel_found_at_the_check_names_its_batch_and_keeps_the_weights_finite() -> None:
    # Checked every log_every_n_steps steps: the run stops at the check after the bad batch, naming it.
    model = _model()
    trainer = _trainer(log_every_n_steps=2)
    found = r"batch 0: 1 NaN or inf pixels in 1 of 8 images at global step 0 .*found at global step 2"
    with pytest.raises(NonFiniteError, match=found):
        trainer.fit(model, train_dataloaders=_loader(bad_batch=0))
    assert trainer.global_step == 2
    assert not nonfinite_entries(model.state_dict())
