"""Class names where a class is shown: attention pictures (files and TensorBoard) and the prediction file."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from stn_lightning.callbacks import AttentionVisualizer, PredictionWriter, class_names_of, draw_attention
from stn_lightning.data.digits import CLASS_NAMES
from stn_lightning.module import STNModule

FASHION = CLASS_NAMES["fashion_mnist"]


def test_draw_attention_captions_with_names() -> None:
    outlines = torch.tensor([[0.0, 0.0], [5.0, 0.0], [5.0, 5.0], [0.0, 0.0]]).view(1, 1, 4, 2)
    fig = draw_attention(
        torch.zeros(1, 1, 8, 8), outlines, torch.zeros(1, 1, 1, 4, 4), labels=["true Coat\npred Shirt"]
    )
    assert fig.axes[0].get_xlabel() == "true Coat\npred Shirt"


def test_class_names_of() -> None:
    assert class_names_of(SimpleNamespace(datamodule=SimpleNamespace(class_names=FASHION))) == FASHION
    assert class_names_of(SimpleNamespace(datamodule=SimpleNamespace(class_names=None))) is None
    assert class_names_of(SimpleNamespace(datamodule=None)) is None
    assert class_names_of(SimpleNamespace(datamodule=SimpleNamespace(class_names="abc"))) is None


@pytest.mark.parametrize("names", [FASHION, None])
def test_the_attention_picture_and_tensorboard_show_the_names(names: Any) -> None:
    torch.manual_seed(0)
    model = STNModule(backbone="stn_paper_cnn", image_size=28)
    figures: list[Any] = []
    experiment = SimpleNamespace(add_figure=lambda tag, fig, global_step: figures.append(fig))
    trainer = SimpleNamespace(
        sanity_checking=False,
        current_epoch=0,
        global_step=3,
        fast_dev_run=True,  # draws without a log folder
        is_global_zero=True,
        logger=SimpleNamespace(experiment=experiment),
        datamodule=SimpleNamespace(class_names=names),
    )
    visualizer = AttentionVisualizer(num_images=2)
    batch = (torch.randn(2, 1, 28, 28), torch.tensor([4, 9]))
    visualizer.on_validation_batch_end(trainer, model, None, batch, 0)  # type: ignore[arg-type]
    visualizer.on_validation_epoch_end(trainer, model)  # type: ignore[arg-type]
    # Short captions take one line, long ones a line per part.
    parts = [caption.replace("\n", ", ").split(", ") for caption in visualizer.last_captions]
    shown = names if names is not None else [str(c) for c in range(10)]
    assert [p[0] for p in parts] == [f"true {shown[4]}", f"true {shown[9]}"]
    assert all(p[1].startswith("pred ") and p[1][5:] in shown for p in parts)
    assert visualizer.last_captions[1].startswith("true Ankle boot\npred " if names else "true 9, pred ")
    (fig,) = figures  # the figure TensorBoard receives carries the same captions
    assert [ax.get_xlabel() for ax in fig.axes[::2]] == visualizer.last_captions


def _predict(tmp_path: Path, output: str, names: tuple[str, ...] | None) -> Path:
    trainer = SimpleNamespace(
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
        world_size=1,
        global_rank=0,
        is_global_zero=True,
        datamodule=SimpleNamespace(class_names=names),
    )
    writer = PredictionWriter(output=str(tmp_path / output), top_k=3)
    writer.setup(trainer, None, "predict")  # type: ignore[arg-type]
    probs = torch.tensor([[0.05, 0.1, 0.05, 0.5, 0.3] + [0.0] * 5, [0.0] * 9 + [1.0]])
    prediction = {"probs": probs, "labels": torch.tensor([3, 9])}
    writer.write_on_batch_end(trainer, None, prediction, [0, 1], (torch.zeros(2, 1, 28, 28),), 0)  # type: ignore[arg-type]
    writer.on_predict_end(trainer, None)  # type: ignore[arg-type]
    return tmp_path / output


def test_the_prediction_file_names_the_classes(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in _predict(tmp_path, "rows.jsonl", FASHION).read_text().splitlines()]
    assert rows[0]["pred"] == 3 and rows[0]["class_name"] == "Dress"
    assert rows[0]["top"] == [[3, 0.5], [4, 0.3], [1, 0.1]] and rows[0]["top_names"] == ["Dress", "Coat", "Trouser"]
    assert rows[1]["class_name"] == "Ankle boot"
    with open(_predict(tmp_path, "rows.csv", FASHION), newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["class_name"] == "Dress" and json.loads(table[0]["top_names"]) == ["Dress", "Coat", "Trouser"]
    assert table[1]["pred"] == "9" and table[1]["class_name"] == "Ankle boot"
    # Without names: no keys in JSON lines, empty columns in CSV.
    plain = json.loads(_predict(tmp_path, "plain.jsonl", None).read_text().splitlines()[0])
    assert "class_name" not in plain and "top_names" not in plain
    with open(_predict(tmp_path, "plain.csv", None), newline="") as f:
        first = next(csv.DictReader(f))
    assert first["pred"] == "3" and first["class_name"] == "" and first["top_names"] == ""
