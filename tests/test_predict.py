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
from timm.data import create_transform

from stn_lightning.cli import main
from stn_lightning.data.imagefolder import FramedEvaluation

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
    x = next(iter(cli.datamodule.predict_dataloader()))[0]
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


def _bad_image(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is no picture")
    return path


def _digit_png(path: Path, size: tuple[int, int] = (40, 50), box: tuple[int, int, int, int] = (12, 10, 20, 40)) -> Path:
    pixels = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 220
    Image.fromarray(pixels).save(path)
    return path


def test_a_failed_predict_leaves_an_existing_file_as_it_was(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    earlier = "".join(json.dumps({"index": i}) + "\n" for i in range(4))
    out.write_text(earlier)
    folder = tmp_path / "bad"
    folder.mkdir()
    _bad_image(folder / "broken.png")
    args = ["predict", "--ckpt_path", str(checkpoint), "--images", str(folder), *COMMON]
    args += ["--trainer.default_root_dir", str(tmp_path), "--predictions.output", str(out)]
    code, log = run(train_cmd(*args), tmp_path, timeout=300)
    assert code == 2, log[-3000:]
    assert "Traceback" not in log and "broken.png" in log, log[-3000:]
    assert out.read_text() == earlier, "the earlier predictions were truncated"
    code, log = run(train_cmd(*args, "--predictions.stop_on_bad_image", "true"), tmp_path, timeout=300)
    assert code == 2 and "broken.png" in log and out.read_text() == earlier, log[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []


def test_every_bad_image_is_named_and_the_others_are_predicted(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [_digit_png(folder / f"good_{i}.png") for i in range(3)]
    bad = [_bad_image(folder / "bad_a.png"), _bad_image(folder / "bad_b.png")]
    (folder / "empty.png").write_bytes(b"")
    bad.append(folder / "empty.png")
    out = tmp_path / "rows.jsonl"
    args = ["predict", "--ckpt_path", str(checkpoint), "--images", str(folder), *COMMON]
    args += ["--trainer.default_root_dir", str(tmp_path), "--predictions.output", str(out)]
    args += ["--data.init_args.batch_size", "2"]  # bad and good images share batches
    code, log = run(train_cmd(*args), tmp_path, timeout=300)
    assert code == 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    for path in bad:
        assert f"cannot read image {path}" in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: 3 of 6 image files could not be read (each named above); the other 3 are in {out}"], log
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in good)


def test_regions_of_a_500_by_300_image_are_in_its_own_pixels(checkpoint: Path, tmp_path: Path) -> None:
    # A model whose transformer reads a known window of its 42 x 42 input: the middle half (scale 0.5, no shift),
    # x and y from 10 to 31 in its pixels. A 500 x 300 file is letterboxed to 42 x 25 (its aspect ratio kept) at
    # rows 8 .. 32, so that window is x 124.5 .. 374.5 and y 29.5 .. 281.5 in the file's own pixels.
    import pytorch_lightning as pl

    from stn_lightning.callbacks import PredictionWriter
    from stn_lightning.data.files import ImageFilesDataModule, grey_transform
    from stn_lightning.module import STNModule

    module = STNModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    head = module.model.transformer.head
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.5, 0.0]))
    image = _digit_png(tmp_path / "wide.png", size=(500, 300), box=(200, 100, 300, 200))  # the digit at its centre
    rows = {}
    for resize in ("letterbox", "squash"):
        out = tmp_path / f"{resize}.jsonl"
        data = ImageFilesDataModule([str(image)], grey_transform((42, 42), (0.1307,), (0.3081,)), batch_size=1)
        writer = PredictionWriter(output=str(out), num_images=0, resize=resize)
        trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)
        trainer.predict(module, datamodule=data)
        rows[resize] = json.loads(out.read_text())
    region = np.asarray(rows["letterbox"]["transformers"][0]["region"])
    assert np.all(region == np.round(region, 2))
    xs, ys = region[:, 0], region[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (124.5, 374.5, 29.5, 281.5), region
    assert xs.min() <= 200 and xs.max() >= 299 and ys.min() <= 100 and ys.max() >= 199  # it covers the digit
    squashed = np.asarray(rows["squash"]["transformers"][0]["region"])  # 500 / 42 across, 300 / 42 down
    expected = (10.5 * 500 / 42 - 0.5, 31.5 * 500 / 42 - 0.5, 10.5 * 300 / 42 - 0.5, 31.5 * 300 / 42 - 0.5)
    found = (squashed[:, 0].min(), squashed[:, 0].max(), squashed[:, 1].min(), squashed[:, 1].max())
    assert np.allclose(found, expected, atol=0.006), (found, expected)


@pytest.mark.parametrize("mode", ["center", "squash"])
@pytest.mark.parametrize("size", [(500, 300), (300, 500)])
def test_class_folder_regions_map_back_into_the_files_pixels(mode: str, size: tuple[int, int]) -> None:
    # timm's evaluation transform resizes and crops a user's image; the frame maps the model's pixels back into the
    # file's, so a bright square found in the model's input lands where it is in the file.
    evaluation = FramedEvaluation(
        create_transform(input_size=(3, 64, 64), is_training=False, crop_pct=0.875, crop_mode=mode)
    )
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    cx, cy = int(width * 0.6), int(height * 0.45)
    pixels[cy - 6 : cy + 7, cx - 6 : cx + 7] = 255
    x = evaluation(Image.fromarray(pixels))[0]
    ys, xs = torch.nonzero(x > x.mean(), as_tuple=True)
    ax, bx, ay, by = evaluation.frame(width, height).tolist()
    # One model pixel is about 4 of the file's here: the square's centre comes back within half of one.
    assert abs(ax * xs.double().mean().item() + bx - cx) < 2.0
    assert abs(ay * ys.double().mean().item() + by - cy) < 2.0


def test_class_folder_transform_without_a_known_frame_says_so() -> None:
    # timm's "border" crop mode pads: no frame, and the regions stay in the model's input pixels.
    evaluation = FramedEvaluation(
        create_transform(input_size=(3, 64, 64), is_training=False, crop_pct=0.875, crop_mode="border")
    )
    assert evaluation.frame is None
