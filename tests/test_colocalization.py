"""Digit boxes in MultiMNIST batches, the co-localisation metric, the overlap penalty and the content coverage,
on known answers."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import pytorch_lightning as pl
import torch

from stn_lightning.data import ClutteredMNIST, MultiMNIST
from stn_lightning.metrics import (
    CoLocalization,
    colocalized,
    content_coverage,
    overlap_penalty,
    points_in_polygons,
    region_centres,
)
from stn_lightning.module import STNModule
from stn_lightning.recipe import LocalizationTraining
from stn_lightning.tasks import SumOfObjects
from stn_lightning.transformer import TransformerSpec
from stn_lightning.transforms import Affine, Attention

SIZE = (64, 64)
# Two digits' boxes (x0, y0, x1, y1) in pixels of a 64 x 64 image.
BOXES = torch.tensor([[4.0, 6.0, 24.0, 26.0], [40.0, 38.0, 58.0, 60.0]])


def _window(cx: float, cy: float, half: float) -> list[float]:
    # Attention parameters (s, tx, ty) of a square region centred at pixel (cx, cy), half a side of `half` pixels.
    w = SIZE[1]
    return [2 * half / w, (2 * cx + 1) / w - 1, (2 * cy + 1) / w - 1]


def _regions(windows: list[list[list[float]]]) -> torch.Tensor:
    return Attention().outline(torch.tensor(windows), SIZE)


ON_A, ON_B = _window(14, 16, 13), _window(49, 49, 13)  # regions of 26 x 26 pixels centred on each digit
EMPTY, SMALL_A = _window(50, 10, 5), _window(14, 16, 4)  # a region on no digit, one inside digit A


def test_region_centres_are_the_warped_centre() -> None:
    regions = _regions([[ON_A, ON_B]])
    torch.testing.assert_close(region_centres(regions)[0], torch.tensor([[14.0, 16.0], [49.0, 49.0]]))
    # A rotated affine region: the centre is still the image of the output's centre.
    c, s = math.cos(0.7), math.sin(0.7)
    params = torch.tensor([[[0.3 * c, -0.3 * s, 0.2, 0.3 * s, 0.3 * c, -0.1]]])
    centre = region_centres(Affine().outline(params, SIZE))[0, 0]
    torch.testing.assert_close(centre, torch.tensor([(1.2 * 64 - 1) / 2, (0.9 * 64 - 1) / 2]))


@pytest.mark.parametrize(
    ("windows", "coloc", "hit", "contains"),
    [
        ([ON_A, ON_B], 1, [1, 1], [1, 1]),  # one transformer on each digit
        ([ON_B, ON_A], 1, [1, 1], [1, 1]),  # swapped: still two distinct digits
        ([ON_A, ON_A], 0, [1, 1], [1, 1]),  # duplicated: both on digit A
        ([ON_A, EMPTY], 0, [1, 0], [1, 0]),  # the second looks at nothing
        ([SMALL_A, ON_B], 1, [1, 1], [0, 1]),  # on A, but too small to hold it whole
    ],
    ids=["placed", "swapped", "duplicated", "one_off", "too_small"],
)
def test_metric_on_hand_placed_regions(windows: list, coloc: int, hit: list[int], contains: list[int]) -> None:
    metric = CoLocalization(2)
    metric.update(_regions([windows]), BOXES[None])
    out = metric.compute()
    assert out["coloc"].item() == coloc
    assert [out[f"hit_{k}"].item() for k in range(2)] == hit
    assert [out[f"contains_{k}"].item() for k in range(2)] == contains


def test_metric_accumulates_fractions_over_batches_and_resets() -> None:
    metric = CoLocalization(2)
    metric.update(_regions([[ON_A, ON_B], [ON_A, ON_A]]), BOXES.expand(2, -1, -1))
    metric.update(_regions([[ON_B, EMPTY], [ON_B, ON_A]]), BOXES.expand(2, -1, -1))
    out = metric.compute()
    assert out["coloc"].item() == pytest.approx(2 / 4)
    assert out["hit_0"].item() == 1.0 and out["hit_1"].item() == pytest.approx(3 / 4)
    assert out["contains_1"].item() == pytest.approx(3 / 4)
    metric.reset()
    metric.update(_regions([[EMPTY, EMPTY]]), BOXES[None])
    assert metric.compute()["coloc"].item() == 0.0


def test_more_or_fewer_transformers_than_digits() -> None:
    boxes = BOXES[None]
    # K = 1 < D = 2: co-localised when the one transformer is on a digit.
    one = CoLocalization(1)
    one.update(_regions([[ON_B]]), boxes)
    one.update(_regions([[EMPTY]]), boxes)
    assert one.compute()["coloc"].item() == pytest.approx(0.5)
    # K = 3 > D = 2: both digits need a transformer of their own; the third may look anywhere.
    three = CoLocalization(3)
    three.update(_regions([[ON_A, EMPTY, ON_B], [ON_A, ON_A, EMPTY]]), boxes.expand(2, -1, -1))
    assert three.compute()["coloc"].item() == pytest.approx(0.5)
    # The matching must be one-to-one: transformer 0 on both digits (overlapping boxes) cannot cover both.
    hits = torch.tensor([[[True, True], [False, False]], [[True, True], [True, False]]])
    assert colocalized(hits).tolist() == [False, True]


def test_contains_uses_the_polygon_not_its_bounding_box() -> None:
    # A square region rotated by 45 degrees around digit A's centre: its bounding box holds the box of A, the
    # diamond itself cuts off A's corners; scaled up by sqrt(2) it holds A whole.
    c = math.cos(math.pi / 4)
    for scale, inside in [(13 / 32, False), (13 * math.sqrt(2) * 1.05 / 32, True)]:
        _, tx, ty = _window(14, 16, 13)
        params = torch.tensor([[[scale * c, -scale * c, tx, scale * c, scale * c, ty]]])
        regions = Affine().outline(params, SIZE)
        lo, hi = regions.amin(-2)[0, 0], regions.amax(-2)[0, 0]
        assert (lo <= BOXES[0, :2]).all() and (hi >= BOXES[0, 2:]).all()  # the bounding box always holds it
        metric = CoLocalization(1)
        metric.update(regions, BOXES[None, :1])
        assert metric.compute()["contains_0"].item() == float(inside)


def test_points_in_polygons_on_a_concave_polygon() -> None:
    # An L-shaped polygon: the notch is outside.
    poly = torch.tensor([[0.0, 0.0], [4.0, 0.0], [4.0, 2.0], [2.0, 2.0], [2.0, 4.0], [0.0, 4.0], [0.0, 0.0]])
    points = torch.tensor([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0], [3.0, 3.0], [5.0, 1.0]])
    inside = points_in_polygons(points[None, None], poly[None, None])[0, 0]
    assert inside.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("num_digits", [2, 3])
def test_multimnist_boxes_hold_the_rendered_ink(num_digits: int) -> None:
    dm = MultiMNIST(num_digits, batch_size=16)
    dm.setup("validate")
    raw = next(iter(dm.val_dataloader()))
    assert len(dm.make_batch(raw, train=False)) == 2  # boxes only on request
    x, y, boxes = dm.on_after_batch_transfer(raw, 0)  # no trainer: an evaluation batch, with boxes
    b, d = raw["digits"].shape[:2]
    assert boxes.shape == (b, d, 4) and boxes.dtype == torch.float32
    h, w = dm.image_size
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    ink = x[:, 0] > dm.background + 1e-4
    # Bilinear sampling spreads ink by less than a pixel: every ink pixel overlaps a box (its centre lies within
    # half a pixel of it), and each box is tight: the ink inside reaches within half a pixel of its four sides.
    tol = 0.5 + 1e-4
    for i in range(b):
        covered = torch.zeros(h, w, dtype=torch.bool)
        for j in range(d):
            x0, y0, x1, y1 = boxes[i, j].tolist()
            near = (xs >= x0 - tol) & (xs <= x1 + tol) & (ys >= y0 - tol) & (ys <= y1 + tol)
            px, py = xs[ink[i] & near], ys[ink[i] & near]
            assert px.numel() > 0
            assert px.min() <= x0 + tol and px.max() >= x1 - tol and py.min() <= y0 + tol and py.max() >= y1 - tol
            covered |= near
        assert not (ink[i] & ~covered).any(), f"ink outside every box in image {i}"
    # Training batches stay (x, y).
    assert len(dm.make_batch(raw | {"digits": raw["digits"][:, :1], "labels": raw["labels"][:, :1]}, True)) == 2


def test_cluttered_boxes_hold_the_digit() -> None:
    dm = ClutteredMNIST(num_clutter=0, batch_size=8)
    dm.setup("validate")
    x, _, boxes = dm.make_batch(next(iter(dm.val_dataloader())), train=False, boxes=True)
    assert boxes.shape == (8, 1, 4)
    ys, xs = torch.meshgrid(torch.arange(60).float(), torch.arange(60).float(), indexing="ij")
    for i in range(8):
        ink = x[i, 0] > dm.background + 1e-4
        x0, y0, x1, y1 = boxes[i, 0].tolist()
        assert xs[ink].min() >= x0 - 0.5 and xs[ink].max() <= x1 + 0.5
        assert ys[ink].min() >= y0 - 0.5 and ys[ink].max() <= y1 + 0.5


def test_overlap_penalty_values() -> None:
    assert overlap_penalty(_regions([[ON_A]])).item() == 0.0  # K = 1: no pairs
    assert overlap_penalty(_regions([[ON_A, ON_B]])).item() == 0.0  # disjoint
    assert overlap_penalty(_regions([[ON_A, ON_A]]), jitter=0).item() == pytest.approx(1.0)
    # Two 26 x 26 squares shifted by half a side: intersection 13 x 26, union 39 x 26, IoU 1/3.
    half = _window(14 + 13, 16, 13)
    assert overlap_penalty(_regions([[ON_A, half]]), jitter=0).item() == pytest.approx(1 / 3, abs=1e-5)
    # Three transformers: the mean over the three pairs (1, 0, 0 with two coinciding).
    assert overlap_penalty(_regions([[ON_A, ON_A, ON_B]]), jitter=0).item() == pytest.approx(1 / 3, abs=1e-5)


@pytest.mark.parametrize(
    ("second", "jitter"),
    [(ON_A, 1e-3), (_window(14.5, 16.3, 13), 0.0)],
    ids=["identical", "nearly_identical_without_jitter"],
)
def test_overlap_gradient_pushes_regions_apart(second: list[float], jitter: float) -> None:
    params = torch.tensor([[ON_A, second]], requires_grad=True)
    penalty = overlap_penalty(Attention().outline(params, SIZE), jitter=jitter)
    penalty.backward()
    assert params.grad is not None and params.grad[..., 1:].abs().sum() > 0
    with torch.no_grad():
        stepped = params - 1e-3 * params.grad
        before = region_centres(Attention().outline(params, SIZE))
        after = region_centres(Attention().outline(stepped, SIZE))
    distance = lambda c: (c[0, 0] - c[0, 1]).norm()  # noqa: E731
    assert distance(after) > distance(before)
    assert overlap_penalty(Attention().outline(stepped, SIZE), jitter=jitter) < penalty


def test_stn_module_logs_colocalization_and_overlap(quiet_trainer: Callable[..., pl.Trainer]) -> None:
    pl.seed_everything(0)
    dm = MultiMNIST(2, batch_size=8)
    module = STNModule.for_data(
        dm,
        backbone="stn_paper_cnn_st",
        # init_scale 1: start at the whole canvas (the default would start zoomed in at 28 / 64)
        transformer=TransformerSpec(
            transform=Attention(scale_range=(0.2, 1.0)), num_transformers=2, crop_size=28, init_scale=1.0
        ),
        fusion="features",
        localization=LocalizationTraining(overlap_weight=0.5, coverage_weight=1.0),
    )
    trainer = quiet_trainer(fast_dev_run=2)
    trainer.fit(module, dm)
    logged = trainer.callback_metrics
    for key in [
        "train/overlap",
        "val/overlap",
        "train/coverage",
        "val/coverage",
        "val/coloc",
        "val/hit_0",
        "val/contains_0",
        "val/contains_1",
    ]:
        assert key in logged and logged[key].isfinite(), key
    # Identity start: both regions are the whole canvas, which holds both digits.
    assert logged["val/contains_0"].item() == 1.0 and logged["val/coloc"].item() == 0.0
    assert logged["val/coverage"].item() > 0.95  # ... and all the ink
    assert trainer.global_step == 2 and logged["train/loss"].isfinite()
    trainer.test(module, dm, verbose=False)
    assert "test/coloc" in trainer.callback_metrics


def test_stn_module_rewards_ink_read_once_with_coverage_once(quiet_trainer: Callable[..., pl.Trainer]) -> None:
    # Both windows start as the whole canvas: all the ink is inside the union, but none is read by exactly one window.
    pl.seed_everything(0)
    dm = MultiMNIST(2, batch_size=8)
    spec = TransformerSpec(transform=Attention(scale_range=(0.2, 1.0)), num_transformers=2, crop_size=28, init_scale=1)
    module = STNModule.for_data(
        dm,
        backbone="stn_paper_cnn_st",
        transformer=spec,
        fusion="features",
        localization=LocalizationTraining(coverage_weight=1.0, coverage_once=True),
    )
    assert STNModule(**module.hparams).localization.coverage_once  # survives the saved hparams
    trainer = quiet_trainer(fast_dev_run=2)
    trainer.fit(module, dm)
    assert trainer.callback_metrics["val/coverage"].item() < 0.1


def _two_digit_image(background: float = 0.0) -> torch.Tensor:
    # Ink (1 above the background) filling each of BOXES, nothing elsewhere.
    img = torch.full((1, 1, *SIZE), background)
    for x0, y0, x1, y1 in BOXES.int().tolist():
        img[..., y0:y1, x0:x1] = background + 1.0
    return img


@pytest.mark.parametrize("background", [0.0, -0.42])
def test_content_coverage_values(background: float) -> None:
    img = _two_digit_image(background)
    cover = lambda windows: content_coverage(_regions([windows]), img, background).item()  # noqa: E731
    assert cover([ON_A, ON_B]) > 0.75  # each digit in its own region (soft edges keep it below 1)
    assert 0.4 < cover([ON_A, ON_A]) < 0.6  # a second region on the same digit adds nothing
    assert 0.4 < cover([ON_A]) < 0.6
    assert cover([EMPTY]) < 0.05
    assert cover([SMALL_A]) < cover([ON_A])
    # An image without content: 0, not NaN.
    assert content_coverage(_regions([[ON_A]]), torch.full((1, 1, *SIZE), background), background).item() == 0.0


def test_content_coverage_gradient_pulls_a_region_onto_uncovered_content() -> None:
    # Region 1 starts just right of digit A, which region 0 does not cover either; region 0 sits on B.
    params = torch.tensor([[ON_B, _window(32, 16, 13)]], requires_grad=True)
    img = _two_digit_image()
    coverage = content_coverage(Attention().outline(params, SIZE), img)
    coverage.sum().backward()
    assert params.grad is not None
    with torch.no_grad():
        stepped = params + 0.05 * params.grad / params.grad.abs().max()
        moved = region_centres(Attention().outline(stepped, SIZE))[0, 1, 0] - 32
    assert moved < -0.5  # towards digit A (x < 32)
    assert content_coverage(Attention().outline(stepped, SIZE), img) > coverage


def test_content_coverage_once_counts_content_read_by_exactly_one_region() -> None:
    img = _two_digit_image()
    cover = lambda windows: content_coverage(_regions([windows]), img, once=True).item()  # noqa: E731
    union = lambda windows: content_coverage(_regions([windows]), img).item()  # noqa: E731
    assert cover([ON_A, ON_B]) > 0.75 and cover([ON_A, ON_B]) == pytest.approx(union([ON_A, ON_B]), abs=0.02)
    assert cover([ON_A]) == pytest.approx(union([ON_A]), abs=1e-6)  # one region: the same count
    # A second region on A takes most of A's share away (the soft edges, 3 px from the ink, keep some of it).
    assert cover([ON_A, ON_A]) < 0.5 * cover([ON_A]) < 0.5 * union([ON_A, ON_A])
    # A spare third region: on background it costs nothing, on a digit that another region reads it costs that digit.
    assert cover([ON_A, ON_B, EMPTY]) == pytest.approx(cover([ON_A, ON_B]), abs=0.02)
    assert cover([ON_A, ON_B, ON_A]) < 0.6


def test_content_coverage_once_gradient_pushes_a_second_region_off_a_read_object() -> None:
    # Region 0 reads digit A; region 1 sits on A too, shifted 3 px right. The union gives region 1 next to no gradient
    # there; the exactly-once count moves it off A (to the right, away from region 0's centre).
    params = torch.tensor([[ON_A, _window(17, 16, 13)]], requires_grad=True)
    img = _two_digit_image()
    coverage = content_coverage(Attention().outline(params, SIZE), img, once=True)
    coverage.sum().backward()
    assert params.grad is not None
    with torch.no_grad():
        stepped = params + 0.05 * params.grad / params.grad.abs().max()
        before = region_centres(Attention().outline(params, SIZE))[0, 1, 0]
        after = region_centres(Attention().outline(stepped, SIZE))[0, 1, 0]
    assert after > before + 0.5
    assert content_coverage(Attention().outline(stepped, SIZE), img, once=True) > coverage


@pytest.mark.parametrize("k", [2, 3])
def test_sum_fusion_is_the_distribution_of_the_sum(k: int) -> None:
    # log P(a_1 + ... + a_K = s) against the enumeration of every tuple of labels.
    import itertools

    from stn_lightning.tasks import log_probability_of_sum

    logits = torch.randn(5, k, 4, generator=torch.Generator().manual_seed(k))
    p = torch.softmax(logits, -1)
    expected = torch.zeros(5, k * 3 + 1)
    for labels in itertools.product(range(4), repeat=k):
        expected[:, sum(labels)] += torch.stack([p[:, i, a] for i, a in enumerate(labels)]).prod(0)
    torch.testing.assert_close(log_probability_of_sum(logits).exp(), expected, atol=1e-6, rtol=1e-5)
    # Two digits 3 and 5 held with certainty give the sum 8 with certainty.
    sure = torch.full((1, 2, 10), -1e4)
    sure[0, 0, 3] = sure[0, 1, 5] = 0.0
    assert log_probability_of_sum(sure).argmax(-1).item() == 8


def test_sum_fusion_model_shapes_and_errors() -> None:
    from stn_lightning.module import STNModule

    options = dict(num_classes=19, image_size=64, backbone="stn_paper_cnn_st", backbone_kwargs={})
    options["task"] = SumOfObjects()
    spec = TransformerSpec(transform=Attention(), num_transformers=2, crop_size=28, init="tiled")
    module = STNModule(**options, transformer=spec, fusion="features")
    logits, params = module.model(torch.randn(3, 1, 64, 64))
    assert logits.shape == (3, 19) and params is not None and params.shape[:2] == (3, 2)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(3))
    assert module.task.head.out_features == 10  # one digit per crop
    with pytest.raises(ValueError, match="num_classes = K"):  # 18 is not a multiple of 4
        spec = TransformerSpec(transform=Attention(), num_transformers=4, crop_size=28)
        STNModule(**{**options, "task": SumOfObjects()}, transformer=spec, fusion="features")
