"""DigitSequences: the sequence label, the rendered strings, the canvas, fixed evaluation sets, errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import Tensor

from stn_lightning.data import DigitSequences, load_digits

BACKGROUND = -0.1307 / 0.3081


def hand_batch(labels: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Test digits with the given labels: digits uint8 (N, D, 28, 28), labels int64 (N, D)."""
    images, classes = load_digits("test")
    first = {c: int((classes == c).nonzero()[0]) for c in range(10)}
    index = torch.tensor([[first[c] for c in row] for row in labels])
    return images[index], classes[index]


def blocks(n: int, d: int) -> Tensor:
    """(n, d, 28, 28) digits that are solid 20x20 squares (MNIST's ink box) of value (i + 1) / (d + 1) at slot i."""
    out = torch.zeros(n, d, 28, 28)
    out[..., 4:24, 4:24] = 1.0
    return out * (torch.arange(1, d + 1) / (d + 1)).view(1, d, 1, 1)


def column_runs(image: Tensor, threshold: float) -> list[float]:
    """The brightest value of each run of columns of ``image`` (H, W) holding a pixel above ``threshold``."""
    inked = (image > threshold).any(0).tolist()
    runs: list[float] = []
    for col, on in enumerate(inked):
        if on and (col == 0 or not inked[col - 1]):
            runs.append(0.0)
        if on:
            runs[-1] = max(runs[-1], float(image[:, col].max()))
    return runs


# ----------------------------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------------------------
def test_attributes_and_default_digit_size() -> None:
    dm = DigitSequences()
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.num_digits, dm.max_length) == (10, 1, (64, 64), 5, 5)
    assert dm.background == pytest.approx(BACKGROUND) and len(dm.mean) == len(dm.std) == 1
    assert dm.digit_size == pytest.approx(12.49, abs=0.01) and dm.train_set is None
    big = DigitSequences(canvas=128, max_length=3, min_length=2, digit_size=30.0)
    assert (big.image_size, big.num_digits, big.digit_size) == ((128, 128), 3, 30.0)
    assert DigitSequences(canvas=128).digit_size == pytest.approx(2 * dm.digit_size)
    # The hyperparameters are the arguments as given (what a checkpoint rebuilds the DataModule from).
    assert dm.hparams["digit_size"] is None and dm.hparams["clutter_size"] is None and dm.clutter_size == 3


def test_labels_against_hand_built_strings() -> None:
    dm = DigitSequences(batch_size=3)
    digits, labels = hand_batch([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0], [3, 1, 4, 1, 5]])
    params = dm.draw(digits.float() / 255, torch.Generator().manual_seed(0))
    assert params["lengths"].shape == (3,) and params["theta"].shape == (3, 5, 2, 3)
    params["lengths"] = torch.tensor([1, 3, 5])
    out = dm.make_batch({"digits": digits, "labels": labels, **params}, train=False, boxes=True)
    assert len(out) == 2  # no boxes for sequences
    x, y = out
    assert x.shape == (3, 1, 64, 64) and y.dtype == torch.int64
    expected = [[1, 1, -1, -1, -1, -1], [3, 6, 7, 8, -1, -1], [5, 3, 1, 4, 1, 5]]
    assert y.tolist() == expected
    with pytest.raises(ValueError, match=r"expected the strings' lengths in params, got only \['theta'\]"):
        dm.make_batch({"digits": digits, "labels": labels, "theta": params["theta"]}, train=False)


def test_training_batches_have_the_label_format() -> None:
    dm = DigitSequences(batch_size=64, val_size=8)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    assert raw["digits"].shape == (64, 1, 28, 28)
    x, y = dm.make_batch(raw, train=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.shape == (64, 6) and y.dtype == torch.int64
    lengths = y[:, 0]
    assert set(lengths.tolist()) == {1, 2, 3, 4, 5}  # uniform over 1..5: 64 draws hit every length
    present = torch.arange(5) < lengths[:, None]
    assert ((y[:, 1:] >= 0) & (y[:, 1:] <= 9)).eq(present).all() and (y[:, 1:][~present] == -1).all()
    assert torch.equal(y[:, 1], raw["labels"][:, 0])  # compose keeps each sample's own digit first
    x2, y2 = dm.make_batch(raw, train=True, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(x, x2) and not torch.equal(y, y2)
    fixed = DigitSequences(min_length=3, max_length=3)
    _, y3 = fixed.make_batch(raw, train=True, generator=torch.Generator().manual_seed(0))
    assert y3.shape == (64, 4) and (y3[:, 0] == 3).all() and (y3[:, 1:] >= 0).all()


# ----------------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------------
def test_exactly_the_first_L_digits_appear_left_to_right() -> None:
    # Upright solid squares one box apart: L separate runs of inked columns, brightest at the right. Strings are
    # drawn with 5 digits (all inside the canvas), then cut to lengths 1..5.
    dm = DigitSequences(min_length=5, max_angle=0.0, jitter=0.0, scale_jitter=0.0, spacing=(1.0, 1.0))
    digits = blocks(5, 5)
    params = dm.draw(digits, torch.Generator().manual_seed(0))
    params["lengths"] = torch.arange(1, 6)
    x = dm.render(digits, params)[:, 0]
    for length in range(1, 6):
        runs = column_runs(x[length - 1], threshold=0.05)
        assert runs == pytest.approx([(i + 1) / 6 for i in range(length)], abs=1e-4)
    # The ink mass is that of the first L blocks, each rendered alone (the others zeroed, the length at 5).
    every = params | {"lengths": torch.full((5,), 5)}
    one = torch.eye(5).view(5, 1, 5, 1, 1)  # one[i] keeps digit slot i
    alone = torch.stack([dm.render(digits * one[i], every).sum(dim=(1, 2, 3)) for i in range(5)], dim=1)  # (5, 5)
    assert (alone > 1.0).all()
    first = torch.arange(5) < params["lengths"][:, None]
    assert torch.allclose(x.sum(dim=(1, 2)), (alone * first).sum(1), rtol=1e-5)


def test_real_digits_in_label_order() -> None:
    dm = DigitSequences(max_angle=0.0)
    digits, labels = hand_batch([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0], [3, 1, 4, 1, 5], [0, 0, 7, 1, 1]])
    params = dm.draw(digits.float() / 255, torch.Generator().manual_seed(1))
    params["lengths"] = torch.tensor([5, 5, 5, 4])
    boxes = dm.digit_boxes(digits.float() / 255, params)
    centres = (boxes[..., 0] + boxes[..., 2]) / 2
    assert (centres[:3].diff(dim=1) > 0).all() and (centres[3, :4].diff() > 0).all()
    assert boxes[3, 4].isnan().all() and not boxes[:3].isnan().any()


def test_nothing_is_lost_outside_the_canvas() -> None:
    # Five digits at the widest spacing, the largest scales and any angle up to 15 degrees.
    kw = {"min_length": 5, "scale_range": (1.15, 1.15), "spacing": (0.75, 0.75), "jitter": 0.08}
    dm = DigitSequences(**kw)
    big = DigitSequences(canvas=3 * 64, digit_size=dm.digit_size, **kw)
    images, _ = load_digits("test")
    digits = images[:160].view(32, 5, 28, 28).float() / 255
    params = dm.draw(digits, torch.Generator().manual_seed(2))
    x = dm.render(digits, params).sum(dim=(1, 2, 3))
    # The same placements in a canvas 3 times larger around the same centre: normalised coordinates shrink 3x.
    theta = params["theta"].clone()
    theta[..., :2] *= 3
    unclipped = big.render(digits, {**params, "theta": theta}).sum(dim=(1, 2, 3))
    assert (x >= 0.99 * unclipped).all(), (x / unclipped).min()
    # The drawn digits' ink boxes lie inside the canvas, for training strings of any length too.
    batch = images[:320].view(64, 5, 28, 28).float() / 255
    boxes = DigitSequences().digit_boxes(batch, DigitSequences().draw(batch, torch.Generator().manual_seed(3)))
    present = ~boxes.isnan()
    assert (boxes[present] >= -0.5 - 1e-3).all() and (boxes[present] <= 63.5 + 1e-3).all()


def test_clutter_is_pasted_on_top() -> None:
    dm = DigitSequences(num_clutter=4)
    assert dm.clutter_size == 3  # 6 / 28 of a 12.5-pixel box
    digits = load_digits("test")[0][:40].view(8, 5, 28, 28).float() / 255
    params = dm.draw(digits, torch.Generator().manual_seed(0))
    assert params["clutter"].shape == (8, 4, 3, 3) and params["clutter_at"].shape == (8, 4, 2)
    clean = {key: params[key] for key in ("lengths", "theta")}
    x, x0 = dm.render(digits, params), dm.render(digits, clean)
    assert (x >= x0).all() and not torch.equal(x, x0)


def test_canvas_128() -> None:
    dm = DigitSequences(canvas=128, batch_size=8, val_size=8)
    dm.setup("fit")
    for raw, train in ((next(iter(dm.train_dataloader())), True), (next(iter(dm.val_dataloader())), False)):
        x, y = dm.make_batch(raw, train=train, generator=torch.Generator().manual_seed(0))
        assert x.shape == (8, 1, 128, 128) and y.shape == (8, 6)
        assert float(x.min()) >= BACKGROUND - 1e-5 and (x.amax(dim=(1, 2, 3)) > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# evaluation sets, files, errors
# ----------------------------------------------------------------------------------------------------------------
def test_evaluation_strings_are_fixed_by_the_seed() -> None:
    a, b, c = (DigitSequences(batch_size=16, val_size=16, seed=s) for s in (3, 3, 4))
    for dm in (a, b, c):
        dm.setup("fit")
    raw = next(iter(a.val_dataloader()))
    assert raw["digits"].shape == (16, 5, 28, 28) and raw["lengths"].shape == (16,)
    xa, ya = a.make_batch(raw, train=False)
    xb, yb = b.make_batch(next(iter(b.val_dataloader())), train=False)
    xc, yc = c.make_batch(next(iter(c.val_dataloader())), train=False)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ya[:, 0], raw["lengths"])
    assert not torch.equal(xa, xc)


def test_image_transform_gives_one_channel_canvas() -> None:
    x = DigitSequences(canvas=128).image_transform()(Image.new("RGB", (90, 40), (0, 0, 0)))
    assert x.shape == (1, 128, 128) and torch.allclose(x, torch.full_like(x, BACKGROUND))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"canvas": 8}, r"expected canvas >= 16 pixels, got 8"),
        ({"max_length": 0}, r"expected max_length >= 1, got 0"),
        ({"min_length": 6}, r"expected 1 <= min_length <= max_length \(5\), got 6"),
        ({"spacing": (0.8, 0.5)}, r"expected spacing as \(low, high\) with 0 < low <= high, got \(0.8, 0.5\)"),
        ({"scale_range": (0.0, 1.0)}, r"expected scale_range as \(low, high\) .*got \(0.0, 1.0\)"),
        ({"jitter": -0.1}, r"expected 0 <= jitter <= 1 .*got -0.1"),
        ({"scale_jitter": 1.0}, r"expected 0 <= scale_jitter < 1, got 1.0"),
        ({"max_angle": 200.0}, r"expected 0 <= max_angle <= 180 degrees, got 200.0"),
        ({"num_clutter": -1}, r"expected num_clutter >= 0, got -1"),
        ({"digit_size": 80.0}, r"expected 4 <= digit_size <= canvas \(64\) pixels, got 80.0"),
        ({"clutter_size": 0}, r"expected 1 <= clutter_size <= 28 pixels \(min\(canvas, 28\)\), got 0"),
        ({"max_length": 30}, r"canvas 64 leaves digit boxes of 2.\d pixels"),
        ({"canvas": 20, "max_length": 1, "clutter_size": 21}, r"expected 1 <= clutter_size <= 20 pixels"),
        ({"val_size": 4000}, r"expected 1 <= val_size < 4000"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DigitSequences(**kwargs)


def test_strings_are_zoomed_to_span_the_fit_range_of_the_canvas() -> None:
    # SVHN-like crops: the ink of each string spans a drawn share of the canvas's width (fit), unless its height
    # would pass max_height; without fit, every digit box has the fixed digit size.
    data = DigitSequences(canvas=64, fit=(0.5, 0.9), max_height=0.6, min_length=3)
    digits = torch.rand(64, 5, 28, 28) * (torch.rand(64, 5, 28, 28) > 0.7)
    params = data.draw(digits, torch.Generator().manual_seed(0))
    boxes = data.digit_boxes(digits, params)  # NaN past each length
    width = boxes[..., 2].nan_to_num(-1e9).amax(1) - boxes[..., 0].nan_to_num(1e9).amin(1) + 1
    height = boxes[..., 3].nan_to_num(-1e9).amax(1) - boxes[..., 1].nan_to_num(1e9).amin(1) + 1
    capped = height >= 0.6 * 64 - 1.5
    assert bool(((width >= 0.5 * 64 - 1.5) | capped).all()) and bool((width <= 0.9 * 64 + 1.5).all())
    assert bool((height <= 0.6 * 64 + 1.5).all())
    loose = DigitSequences(canvas=64, fit=None, min_length=3).draw(digits, torch.Generator().manual_seed(0))
    assert not torch.allclose(loose["theta"], params["theta"])
