"""Every mistake a user can make, end to end through the CLI: one clear message, no traceback, nothing lost.

Each case exits non-zero with one line on stderr (status 2 for bad input, 1 for a non-finite run), leaves
existing checkpoints and logs untouched, and a run that fails before training leaves no ``version_N`` folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stn_lightning.cli import main
from stn_lightning.module import STNModule
from stn_lightning.transformer import TransformerSpec
from stn_lightning.transforms import Projective

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def _args(tmp_path: Path, *extra: str, sub: str = "fit", config: Path = DEMO) -> list[str]:
    base = [sub, "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    base += ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    base += ["--data.init_args.batch_size", "4"]
    if sub == "fit":
        base += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    else:
        base += [f"--trainer.limit_{sub}_batches", "1"]
    return base + list(extra)


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def _checkpoint(tmp_path: Path, model: STNModule, name: str = "good.ckpt") -> Path:
    path = tmp_path / name
    hparams = {k: v for k, v in model.hparams.items()}
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
         "pytorch-lightning_version": "2.6.6"},
        path,
    )  # fmt: skip
    return path


def _demo_model(**kwargs: object) -> STNModule:
    # The model demo.yaml builds (RTS digits: 42 x 42, background of the bundled digits' normalisation).
    options: dict[str, object] = dict(image_size=(42, 42), background=-0.1307 / 0.3081)
    options.update(kwargs)
    return STNModule(**options)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------------
# checkpoints given to --ckpt_path
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"PK\x03\x04 only the start of a zip file", "cannot read checkpoint"),
        (b"name,value\nlr,0.1\n", "cannot read checkpoint"),
        ("tensor", "is not a Lightning checkpoint"),
        ("truncated", "cannot read checkpoint"),
        ("missing", "does not exist"),
    ],
)
def test_bad_checkpoint_files(
    content: bytes | str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "given.ckpt"
    if content == "tensor":
        torch.save(torch.ones(3), path)
    elif content == "truncated":
        good = _checkpoint(tmp_path, _demo_model()).read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif content != "missing":
        assert isinstance(content, bytes)
        path.write_bytes(content)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "kept.txt").write_text("an earlier run")
    before = _snapshot(tmp_path)
    line = _fails(_args(logs, "--ckpt_path", str(path)), capsys)
    assert message in line and str(path) in line
    assert _snapshot(tmp_path) == before, "the failed run changed files"
    assert not (logs / "lightning_logs").exists()


def test_checkpoint_of_another_model_says_what_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A projective transformer's weights under the affine demo's hyperparameters: the warp head has 8 outputs, not 6.
    path = _checkpoint(tmp_path, _demo_model(transformer=TransformerSpec(transform=Projective())))
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["transformer"] = TransformerSpec().config()
    torch.save(checkpoint, path)
    line = _fails(_args(tmp_path, "--ckpt_path", str(path), sub="test"), capsys)
    assert "different model" in line and "transformer.head.weight" in line and "(8, 50)" in line and "(6, 50)" in line


def test_checkpoint_hyperparameters_name_the_option_they_replace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _checkpoint(tmp_path, _demo_model(label_smoothing=0.25))
    cli = main(_args(tmp_path, "--ckpt_path", str(path), "--model.label_smoothing", "0.5", sub="test"))
    err = capsys.readouterr().err
    assert "model.label_smoothing: the checkpoint's value 0.25 replaces the given 0.5" in err
    assert cli.model.hparams.label_smoothing == 0.25


def test_ckpt_path_last_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(_args(tmp_path, "--ckpt_path", "last", sub="test"), capsys)
    assert "no last.ckpt under" in line


# ------------------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------------------
def test_a_linked_value_set_in_yaml_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(DEMO.read_text().replace("model:\n", "model:\n  num_classes: 7\n", 1))
    line = _fails(_args(tmp_path, config=config), capsys)
    assert "model.num_classes is 7" in line and "DistortedMNIST.num_classes = 10" in line
    assert not (tmp_path / "lightning_logs").exists()


def test_a_linked_value_that_agrees_with_the_data_is_accepted(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(DEMO.read_text().replace("model:\n", "model:\n  num_classes: 10\n", 1))
    cli = main(_args(tmp_path, "--trainer.fast_dev_run", "true", config=config))
    assert cli.trainer.state.finished


def test_a_linked_value_on_the_command_line_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # jsonargparse's own check (the YAML case above is ours).
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path, "--model.num_classes", "7"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'must be given via "data.num_classes"' in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer.accelerator", "gpu"], "gpu"),
        (["--model.nonfinite", "ignore"], "nonfinite"),
        (["--checkpoint.last_every_n_steps", "0"], "last_every_n_steps"),
        (["--model.backbone", "resnet18"], None),
        (["--data.init_args.batch_size", "0"], "error: expected batch_size >= 1, got 0\n"),
    ],
)
def test_bad_options(extra: list[str], message: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = DEMO
    if message is None:  # the image-folder data picks its normalisation from its own backbone option
        config, message = (
            ROOT / "configs" / "cub200_4x.yaml",
            "model.backbone = 'resnet18' but data.backbone = 'resnet50'",
        )
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path, *extra, config=config))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "lightning_logs").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "nope.yaml" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "")  # main sets it for the DDP ranks; monkeypatch restores it
    with pytest.raises(ValueError, match="no last.ckpt"):
        main(_args(tmp_path, "--ckpt_path", "last", "--debug", sub="test"))


def test_fast_dev_run_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(DEMO), "--trainer.fast_dev_run", "true", "--data.init_args.batch_size", "4"]
    cli = main(args + ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.state.finished
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_an_undecodable_image_is_named(
    damage: str, workers: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _image_folder(tmp_path / "images")
    bad = root / "train" / "class_1" / "2.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"these are not pixels")
    args = _args(tmp_path, config=ROOT / "configs" / "cub200_4x.yaml")
    args += [
        "--data.init_args.root",
        str(root),
        "--data.init_args.num_classes",
        "2",
        "--data.init_args.input_size",
        "64",
    ]
    args += [
        "--data.init_args.num_workers",
        str(workers),
        "--data.init_args.batch_size",
        "6",
        "--trainer.precision",
        "32",
    ]
    args += ["--model.transformer.crop_size", "32", "--model.backbone", "resnet10t"]
    args += ["--data.init_args.backbone", "resnet10t", "--model.transformer.num_transformers", "1"]
    args += ["--model.transformer.localizer", "stn_lightning.localization.PaperLocalizer"]
    line = _fails(args, capsys)
    assert f"cannot read image {bad}" in line
    assert not (tmp_path / "lightning_logs").exists()
