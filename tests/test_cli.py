"""Bad input and parser behaviour through the CLI (every config trains in tests/test_configs.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stn_lightning.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _tiny_image_folder(root: Path, classes: int = 3, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"{c:03d}.class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, size=(40, 52, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def _fast_args(config: Path, tmp_path: Path) -> list[str]:
    args = [
        "fit",
        "--config",
        str(config),
        "--trainer.fast_dev_run",
        "true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--data.init_args.batch_size",
        "4",
    ]
    if "cub200" in config.name:
        root = _tiny_image_folder(tmp_path / "cub")
        args += ["--data.init_args.root", str(root), "--data.init_args.num_classes", "3"]
        args += ["--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]
    return args


def test_print_config_shows_links_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS[0]), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "localization:" in out and "lr_scale" in out and "class_path: stn_lightning.data" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.transformer.num_transformers", "0"], "num_transformers >= 1"),
        (["--model.backbone", "resnet_10t"], "closest valid names"),
        (["--model.transformer.crop_size", "0"], "output size"),
        # argparse would take a prefix of one option for the option: a typo must not run as another setting
        (["--trainer.max_epoch", "3"], "unrecognized arguments: --trainer.max_epoch"),
    ],
)
def test_bad_input_exits_with_a_message(
    override: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = next(c for c in CONFIGS if c.stem == "rts_mnist")
    with pytest.raises(SystemExit) as exit_info:
        main(_fast_args(config, tmp_path) + override)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_image_folder_says_how_to_arrange_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = next(c for c in CONFIGS if c.stem == "cub200_4x")
    args = _fast_args(config, tmp_path) + ["--data.init_args.root", str(tmp_path / "missing")]
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "train" in err and "class" in err
