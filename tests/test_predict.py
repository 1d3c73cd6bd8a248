"""Predictions on the bundled digits and on a folder of the user's own images, one row per image, every field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from subprocess_helpers import ROOT, run, train_cmd

from stn_lightning.cli import main

DEMO = ROOT / "configs" / "demo.yaml"
COMMON = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    args = ["fit", "--config", str(DEMO), *COMMON, "--trainer.default_root_dir", str(root)]
    args += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "8"]
    main(args)
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def _check_row(row: dict, classes: int = 10, params: int = 6) -> None:
    assert 0 <= row["pred"] < classes and 0 < row["prob"] <= 1
    top = row["top"]
    assert len(top) == 5 and top[0] == [row["pred"], row["prob"]]
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:], strict=False))
    (transformer,) = row["transformers"]
    assert len(transformer["params"]) == params
    region = np.asarray(transformer["region"])
    assert region.shape == (17, 2) and np.allclose(region[0], region[-1])  # a closed polygon, corners included


def test_rows_for_the_bundled_digits(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    args = ["predict", "--config", str(DEMO), *COMMON, "--ckpt_path", str(checkpoint)]
    args += ["--trainer.default_root_dir", str(tmp_path), "--data.init_args.batch_size", "4"]
    args += ["--trainer.limit_predict_batches", "3", "--predictions.output", str(out)]
    main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(12)) and [r["image"] for r in rows] == list(range(12))
    for row in rows:
        _check_row(row)
        assert 0 <= row["label"] < 10
        # The digits' class names are the digits themselves.
        assert row["class_name"] == str(row["pred"]) and row["top_names"] == [str(c) for c, _ in row["top"]]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_rows_for_a_folder_of_pngs_with_only_the_checkpoint(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(5):
        pixels = np.zeros((50 + i, 40), np.uint8)  # any size and mode: resized and turned grey like the digits
        pixels[10:40, 12 + i : 20 + i] = rng.integers(150, 255)
        names.append(folder / f"digit_{i}.png")
        Image.fromarray(pixels).convert("RGB").save(names[-1])
    out = tmp_path / "predictions.csv"
    args = ["predict", "--ckpt_path", str(checkpoint), "--images", str(folder), *COMMON]
    args += ["--trainer.default_root_dir", str(tmp_path), "--predictions.output", str(out)]
    cli = main(args)
    assert type(cli.datamodule).__name__ == "ImageFilesDataModule"
    assert "predictions: 5 rows" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [str(n) for n in names]
    for row in rows:
        assert row["label"] == "" and row["class_name"] == row["pred"]  # the training data's names reach --images
        parsed = {"pred": int(row["pred"]), "prob": float(row["prob"]), "top": json.loads(row["top"])}
        _check_row({**parsed, "transformers": json.loads(row["transformers"])})
    # The files were prepared like the training digits: 42 x 42, one channel, the digits' normalisation.
    x, _ = next(iter(cli.datamodule.predict_dataloader()))
    assert x.shape == (5, 1, 42, 42) and torch.isclose(x.min(), torch.tensor(-0.1307 / 0.3081), atol=1e-4)


def test_a_folder_without_images_is_an_error(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt_path", str(checkpoint), "--images", str(tmp_path), *COMMON])
    assert exit_info.value.code == 2


def test_predict_under_ddp_merges_one_row_per_image(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    args = ["predict", "--config", str(DEMO), "--ckpt_path", str(checkpoint), *COMMON, "--trainer.devices", "2"]
    args += ["--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--data.init_args.batch_size", "5", "--trainer.limit_predict_batches", "2"]
    args += ["--predictions.output", str(out)]
    code, log = run(train_cmd(*args), tmp_path, timeout=300)
    assert code == 0, log[-3000:]
    with open(out, newline="") as f:
        indices = [int(r["index"]) for r in csv.DictReader(f)]
    assert indices == list(range(20))  # 2 ranks x 2 batches x 5, each image once, in order
    assert not list(tmp_path.glob(".rows.csv.rank*"))


def test_the_checkpoint_alone_rebuilds_a_non_default_transformation_family(tmp_path: Path) -> None:
    # STNModule's hyperparameters leave its object options out; the checkpoint stores them next to the data's.
    args = ["fit", "--config", str(DEMO), *COMMON, "--trainer.default_root_dir", str(tmp_path / "fit")]
    args += ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "4"]
    args += ["--model.transformer.transform", "stn_lightning.transforms.Attention"]
    main(args)
    ckpt = tmp_path / "fit" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)["hyper_parameters"]["transformer"]
    assert stored["transform"]["class_path"] == "stn_lightning.transforms.Attention"
    out = tmp_path / "rows.jsonl"
    args = ["predict", "--ckpt_path", str(ckpt), *COMMON, "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.limit_predict_batches", "1", "--data.init_args.batch_size", "2"]
    args += ["--predictions.output", str(out)]
    cli = main(args)
    assert type(cli.model.model.transformer.transform).__name__ == "Attention"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        _check_row(row, params=3)  # scale and translation
