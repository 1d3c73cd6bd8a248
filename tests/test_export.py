"""``stn-train export``: ONNX models and torch.export programs of checkpoints match the PyTorch model.

Nothing is trained: each model is built as a config would build it, its localisation head is given small random
weights and its batch-norm statistics are moved by a few training-mode passes (so that the warps depend on the
image and eval mode matters), and it is saved as a Lightning checkpoint. The export runs through the CLI; the
exported model is compared with the PyTorch model in eval mode on validation digits at two batch sizes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from stn_lightning.cli import main
from stn_lightning.data import DistortedMNIST, MNISTAddition
from stn_lightning.module import STNModule
from stn_lightning.tasks import SetOfObjects, SumOfObjects
from stn_lightning.transformer import TransformerSpec
from stn_lightning.transforms import Affine, Attention, ThinPlateSpline

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # float32 through two runtimes: the measured differences are 1e-8 to 1e-6 (printed by the tests)
BATCH_SIZES = (3, 8)

# name: (STNModule arguments, extra CLI arguments). The transformer (its family included) is a hyperparameter of the
# checkpoint; the config below says it again, as a run's own config would.
_TPS_CONFIG = "model:\n  transformer:\n    transform:\n      class_path: stn_lightning.transforms.ThinPlateSpline\n"
MODELS: dict[str, dict[str, Any]] = {
    # configs/demo.yaml: one affine transformer in front of resnet10t on 42 x 42 RTS digits.
    "affine": {
        "kwargs": {"transformer": TransformerSpec(transform=Affine())},
        "config": str(ROOT / "configs" / "demo.yaml"),
    },
    # K = 2 thin-plate splines, a shared backbone over the crops (the spline's solve is an inverse in the graph); the
    # paper's ST-CNN as that backbone (resnet10t and its batch norm are the affine model's).
    "tps_k2": {
        "kwargs": {
            "transformer": TransformerSpec(transform=ThinPlateSpline(), num_transformers=2),
            "backbone": "stn_paper_cnn_st",
            "fusion": "features",
        },
        "config": _TPS_CONFIG,
    },
    # configs/scenes.yaml's set task: K = 3 attention windows, and in eval mode the crops whose windows overlap a more
    # confident one's say "nothing" (a loop over K, sorting and gathering in the graph).
    "set_suppress": {
        "kwargs": {
            "transformer": TransformerSpec(transform=Attention(scale_range=(0.3, 0.6)), num_transformers=3),
            "backbone": "stn_paper_cnn_st",
            "fusion": "features",
            "task": SetOfObjects(suppress=0.3),
        },
        "config": None,
    },
    # The baseline: no transformer, so the export has the logits only; the checkpoint alone is enough.
    "baseline": {"kwargs": {"fusion": "none", "backbone": "stn_paper_cnn"}, "config": None},
    # configs/mnist_addition.yaml: the paper's CNN (adaptive max-pooling) on two digit channels, crop k of
    # transformer k keeping channel k, and the sum head.
    "addition": {
        "kwargs": {
            "transformer": TransformerSpec(transform=Affine(), num_transformers=2),
            "backbone": "stn_paper_cnn_st",
            "fusion": "features",
            "task": SumOfObjects(),
            "object_channels": True,
        },
        "config": None,
        "data": MNISTAddition,
    },
}


def _data(name: str, **kwargs: Any) -> pl.LightningDataModule:
    return MODELS[name].get("data", lambda **kw: DistortedMNIST("RTS", **kw))(**kwargs)


@pytest.fixture(scope="module")
def batches() -> dict[str, Tensor]:
    """Validation images (8, C, 42, 42) of each model's bundled digits, with their stored distortions."""
    by_data: dict[Any, Tensor] = {}  # the RTS models share one data module: load each kind once
    found = {}
    for name in MODELS:
        kind = MODELS[name].get("data", DistortedMNIST)
        if kind not in by_data:
            data = _data(name, batch_size=max(BATCH_SIZES))
            data.setup("validate")
            by_data[kind], _ = data.make_batch(next(iter(data.val_dataloader())), train=False)
        found[name] = by_data[kind]
    return found


@pytest.fixture(scope="module")
def digits(batches: dict[str, Tensor]) -> Tensor:
    """Validation images (8, 1, 42, 42) of the bundled RTS digits."""
    return batches["affine"]


def _build(name: str, digits: Tensor) -> STNModule:
    torch.manual_seed(0)
    data = _data(name)  # what the CLI links into the model: classes, channels, size, background
    shape = {"num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size}
    module = STNModule(**shape, background=data.background, **MODELS[name]["kwargs"])
    if module.transformer is not None:
        with torch.no_grad():
            module.transformer.head.weight.normal_(0.0, 0.05)
    module.train()
    with torch.no_grad():  # batch-norm running statistics away from their start
        for _ in range(2):
            module.model(digits)
    return module.eval()


def _save(module: STNModule, path: Path) -> Path:
    # What Trainer.save_checkpoint writes, less the loops' and optimisers' states.
    checkpoint = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
    }
    torch.save(checkpoint, path)
    return path


def _export(name: str, module: STNModule, tmp: Path, suffix: str) -> tuple[Path, float]:
    ckpt = _save(module, tmp / f"{name}.ckpt")
    output = tmp / f"{name}{suffix}"
    args = ["export", "--ckpt_path", str(ckpt), "--output", str(output)]
    config = MODELS[name]["config"]
    if config is not None and not config.endswith(".yaml"):
        (tmp / f"{name}.yaml").write_text(config)
        config = str(tmp / f"{name}.yaml")
    if config is not None:
        args = ["export", "--config", config, *args[1:]]
    start = time.perf_counter()
    main(args)
    assert output.is_file()
    return output, time.perf_counter() - start


def _reference(module: STNModule, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        logits, params = module.model(x)
    return [logits] if params is None else [logits, params]


def _errors(got: list[Any], expected: list[Tensor]) -> list[float]:
    assert len(got) == len(expected)
    return [float((torch.as_tensor(g) - e).abs().max()) for g, e in zip(got, expected, strict=True)]


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_matches_pytorch(
    name: str, batches: dict[str, Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[dev])")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e .[dev])")
    pytest.importorskip("onnxscript", reason="onnxscript (the ONNX exporter's backend) is not installed")
    monkeypatch.chdir(tmp_path)  # whatever the CLI might write goes there
    digits = batches[name]
    module = _build(name, digits)
    path, seconds = _export(name, module, tmp_path, ".onnx")

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    outputs = [o.name for o in model.graph.output]
    assert outputs == (["logits"] if name == "baseline" else ["logits", "params"])

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for b in BATCH_SIZES:
        x = digits[:b]
        expected = _reference(module, x)
        got = session.run(None, {"images": x.numpy()})
        assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
        errors = _errors(got, expected)
        print(
            f"{name} onnx B={b}: max |diff| " + ", ".join(f"{n} {e:.2e}" for n, e in zip(outputs, errors, strict=True))
        )
        assert max(errors) <= TOLERANCE
    if len(expected) > 1:  # the warps depend on the image: the comparison of params is not one of constants
        assert float(expected[1].std(0).max()) > 1e-3
    print(f"{name} onnx export: {seconds:.1f} s")


@pytest.mark.parametrize("name", list(MODELS))
def test_program_matches_pytorch(
    name: str, batches: dict[str, Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    digits = batches[name]
    module = _build(name, digits)
    path, seconds = _export(name, module, tmp_path, ".pt2")
    program = torch.export.load(str(path)).module()
    for b in BATCH_SIZES:
        x = digits[:b]
        expected = _reference(module, x)
        with torch.no_grad():
            got = program(x)
        got = list(got) if isinstance(got, (tuple, list)) else [got]
        errors = _errors(got, expected)
        print(f"{name} pt2 B={b}: max |diff| " + ", ".join(f"{e:.2e}" for e in errors))
        assert max(errors) <= TOLERANCE
    print(f"{name} pt2 export: {seconds:.1f} s")


def test_export_keeps_the_module_as_it_was(digits: Tensor) -> None:
    from stn_lightning.export import export_program

    module = _build("affine", digits).train()
    assert module.transformer is not None
    module.transformer.backend = "auto"
    program = export_program(module, example=digits[:2])
    assert module.training and module.transformer.backend == "auto"
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any("triton" in t for t in targets)  # the PyTorch sampler was traced


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--output", "model.onnx"], "--ckpt_path"),
        (["--ckpt_path", "CKPT"], "--output"),
        (["--ckpt_path", "CKPT", "--output", "model.tflite"], "expected an output ending in .onnx, .pt2"),
        (["--ckpt_path", "best", "--output", "model.onnx"], "a checkpoint file"),
    ],
)
def test_bad_export_arguments_exit_with_a_message(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = _save(STNModule(fusion="none", backbone="resnet10t"), tmp_path / "m.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *[str(ckpt) if a == "CKPT" else a for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_onnx_exporter_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import stn_lightning.export as export

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export, "_ONNX_PACKAGES", ("onnx", "no_such_onnx_exporter"))
    ckpt = _save(STNModule(fusion="none"), tmp_path / "m.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(ckpt), "--output", "model.onnx"])
    assert exit_info.value.code == 2
    assert "ONNX export needs the packages no_such_onnx_exporter" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


def test_the_checkpoint_alone_gives_the_transformation_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = TransformerSpec(transform=ThinPlateSpline())
    ckpt = _save(STNModule(image_size=42, transformer=spec), tmp_path / "tps.ckpt")
    # Saved outside the CLI, the checkpoint's hyperparameters still hold the family: no config needed.
    main(["export", "--ckpt_path", str(ckpt), "--output", "model.pt2"])
    assert (tmp_path / "model.pt2").is_file()
