"""Every YAML in configs/ trained through cli.main on CPU for two steps and one validation batch (docs/DESIGN.md,
convention 8), with timm's large backbones swapped for a tiny one: the run logs a finite loss and the config's
accuracy, and writes a checkpoint that holds the trained state and the data's arguments."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

import stn_lightning.localization
import stn_lightning.model
from stn_lightning.cli import main
from stn_lightning.module import STNModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
# The project's own networks (stn_paper_cnn, stn_sequence_cnn, ...) are small, and the inner-transformer configs
# name their submodules, so only timm's own models are swapped.
TINY = "test_resnet"
STEPS = 2
CUB_CLASSES = 3


def _image_folder(root: Path) -> Path:
    # Two photos per class and split, each class a plain colour of its own, at sizes the DataModule must resize.
    for split, label, i in itertools.product(("train", "test"), range(CUB_CLASSES), range(2)):
        folder = root / split / f"{label:03d}.class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (52 + 7 * i, 40), color=(80 * label, 40 + 50 * i, 200 - 60 * label)).save(folder / f"{i}.jpg")
    return root


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Swap every timm model the run builds (backbone and localiser) for a tiny one; returns the names asked for."""
    names: list[str] = []
    real = stn_lightning.localization.create_timm_model

    def tiny(name: str, *, pretrained: Any = None, **kwargs: Any) -> Any:
        names.append(name)
        if name.startswith("stn_"):
            return real(name, pretrained=pretrained, **kwargs)
        return real(TINY, pretrained=None, **kwargs)

    monkeypatch.setattr(stn_lightning.model, "create_timm_model", tiny)
    monkeypatch.setattr(stn_lightning.localization, "create_timm_model", tiny)
    return names


def _args(config: Path, tmp_path: Path) -> list[str]:
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32"]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(STEPS)]
    args += ["--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]
    args += ["--trainer.log_every_n_steps", "1", "--trainer.logger", "pytorch_lightning.loggers.CSVLogger"]
    args += ["--trainer.logger.save_dir", str(tmp_path)]
    args += ["--data.init_args.batch_size", "4", "--attention.num_images", "2"]
    if "cub200" in config.name:  # a tiny image folder instead of the birds; the last value of an option wins
        cub = {
            "root": str(_image_folder(tmp_path / "cub")),
            "num_classes": str(CUB_CLASSES),
            "batch_size": "2",
            "num_workers": "0",
        }
        args += [word for key, value in cub.items() for word in (f"--data.init_args.{key}", value)]
    return args


def test_the_paper_experiments_have_configs() -> None:
    names = {c.stem for c in CONFIGS}
    assert {"demo", "rts_mnist", "rts_mnist_cnn", "p_mnist", "e_mnist", "cluttered_mnist"} <= names
    assert {"mnist_addition", "multi_mnist", "sequences", "sequences_cnn", "sequences_single", "cub200_4x"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_trains_logs_and_checkpoints(config: Path, tmp_path: Path, asked: list[str]) -> None:
    text = config.read_text()
    cli = main(_args(config, tmp_path))
    assert cli is not None
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    assert trainer.state.finished and trainer.global_step == STEPS
    # The config's own backbone was asked for (and swapped when it is one of timm's).
    assert yaml.safe_load(text)["model"]["backbone"] in asked
    assert model.hparams.num_classes == data.num_classes and model.hparams.in_chans == data.in_chans

    # Metrics: what the logger wrote to disk, every step's training loss finite, the validation accuracy in [0, 1].
    log_dir = Path(trainer.logger.log_dir)
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    accuracy = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(accuracy[0])

    # Checkpoint: last.ckpt holds the trained weights, the step and the data's arguments.
    last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    state = model.state_dict()
    assert checkpoint["state_dict"].keys() == state.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in state.items())
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == data.batch_size
    if model.model.transformer is not None:
        assert list((log_dir / "attention").glob("*.png")), "no attention picture"

    # The checkpoint loads in Python (Lightning's load_from_checkpoint) into the same model.
    if model.inner_transformers:
        # Known gap (issue 34): the saved hyperparameters do not hold the inner transformers (only the CLI's own
        # stn_model_config does), so Lightning's loader builds the backbone without them and the weights do not fit.
        with pytest.raises(RuntimeError, match="Unexpected key"):
            STNModule.load_from_checkpoint(last, map_location="cpu")
        return
    loaded = STNModule.load_from_checkpoint(last, map_location="cpu")
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
