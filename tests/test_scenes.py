"""DigitScenes and the set task (SetOfObjects): the matching loss against brute force, the set metrics and the
co-localisation of scenes with absent digits on hand-built batches, the scene generator's counts, overlaps and boxes,
and the module training on scenes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from stn_lightning.data import DigitScenes, load_digits
from stn_lightning.data.scenes import box_overlap
from stn_lightning.metrics import CoLocalization, colocalized, region_iou
from stn_lightning.model import STNClassifier
from stn_lightning.module import STNModule
from stn_lightning.tasks import SetOfObjects, SumOfObjects, keep_distinct, match_objects
from stn_lightning.transformer import TransformerSpec
from stn_lightning.transforms import Attention

BACKGROUND = -0.1307 / 0.3081


def _task(k: int = 3, classes: int = 10, **kwargs: float) -> SetOfObjects:
    task = SetOfObjects(**kwargs)  # type: ignore[arg-type]
    task.build(in_features=4, num_classes=classes, num_objects=k)
    return task


def _sure(answers: list[list[int]], classes: int = 10, margin: float = 12.0) -> torch.Tensor:
    # Flat outputs (B, K (C + 1)) whose crop k is sure of answers[b][k] (-1: "nothing").
    logits = torch.zeros(len(answers), len(answers[0]), classes + 1)
    for b, row in enumerate(answers):
        for k, a in enumerate(row):
            logits[b, k, a if a >= 0 else classes] = margin
    return logits.flatten(1)


# ----------------------------------------------------------------------------------------------------------------
# the matching loss
# ----------------------------------------------------------------------------------------------------------------
def _brute_force(log_p: torch.Tensor, target: torch.Tensor) -> tuple[float, list[int]]:
    # The least total cost -log p over every one-to-one pairing of min(K, D) crops with min(K, D) objects, and the
    # answers it gives (C for "nothing").
    k, classes = log_p.shape[0], log_p.shape[1] - 1
    objects = [int(v) for v in target if v >= 0]
    n = min(k, len(objects))
    best: tuple[float, list[int]] = (math.inf, [])
    for crops in itertools.permutations(range(k), n):
        for chosen in itertools.permutations(range(len(objects)), n):
            cost = -sum(float(log_p[c, objects[o]]) for c, o in zip(crops, chosen, strict=True))
            if cost < best[0]:
                answers = [classes] * k
                for c, o in zip(crops, chosen, strict=True):
                    answers[c] = objects[o]
                best = (cost, answers)
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matching_is_the_cheapest_assignment(k: int) -> None:
    torch.manual_seed(k)
    # Scenes of 0 to 4 objects (so K < D, K = D and K > D), repeated classes included.
    target = torch.tensor([[-1, -1, -1, -1], [5, -1, -1, -1], [2, 2, -1, -1], [-1, 7, 1, -1], [3, 0, 3, 9]])
    log_p = torch.log_softmax(3 * torch.randn(len(target), k, 11), dim=-1)
    answers = match_objects(log_p, target)
    task = _task(k)
    outputs = log_p.flatten(1)
    expected = 0.0
    for b in range(len(target)):
        cost, brute = _brute_force(log_p[b], target[b])
        got = answers[b].tolist()
        assert -sum(float(log_p[b, i, a]) for i, a in enumerate(got) if a < 10) == pytest.approx(cost, rel=1e-5)
        assert got == brute  # random costs: the cheapest assignment is unique
        assert got.count(10) == k - min(k, int((target[b] >= 0).sum()))  # spares say "nothing"
        expected -= sum(float(log_p[b, i, a]) for i, a in enumerate(brute))
    # The loss: cross-entropy of every crop against its matched answer, the mean over the crops.
    assert float(task.loss(outputs, target)) == pytest.approx(expected / (len(target) * k), rel=1e-5)


def test_hand_built_slots_and_the_weight_of_nothing() -> None:
    task = _task(3)
    target = torch.tensor([[3, 7, -1], [4, -1, -1]])
    # Crops that say 7, 3 and nothing on {3, 7}, and 4, nothing, nothing on {4}: matched in any order.
    outputs = _sure([[7, 3, -1], [-1, 4, -1]])
    log_p = torch.log_softmax(outputs.unflatten(1, (3, 11)), -1)
    assert match_objects(log_p, target).tolist() == [[7, 3, 10], [10, 4, 10]]
    assert float(task.loss(outputs, target)) < 1e-3
    # A spare crop that claims a digit costs what "nothing" would have scored; nothing_weight scales those terms.
    wrong = _sure([[7, 3, 5], [-1, 4, -1]])
    terms = F.cross_entropy(
        wrong.unflatten(1, (3, 11)).flatten(0, 1), torch.tensor([7, 3, 10, 10, 4, 10]), reduction="none"
    )
    assert float(task.loss(wrong, target)) == pytest.approx(float(terms.mean()), rel=1e-5)
    light = _task(3, nothing_weight=0.25)
    w = torch.tensor([1, 1, 0.25, 0.25, 1, 0.25])
    assert float(light.loss(wrong, target)) == pytest.approx(float((terms * w).sum() / w.sum()), rel=1e-5)
    # Every crop's logits get a gradient, the spares' too.
    outputs = torch.randn(2, 33, requires_grad=True)
    task.loss(outputs, target).backward()
    assert outputs.grad is not None and (outputs.grad.unflatten(1, (3, 11)).abs().sum(-1) > 0).all()


def test_more_digits_than_crops_leave_some_missed() -> None:
    task = _task(2)
    target = torch.tensor([[1, 2, 3]])
    outputs = _sure([[3, 1]])
    assert match_objects(torch.log_softmax(outputs.unflatten(1, (2, 11)), -1), target).tolist() == [[3, 1]]
    assert float(task.loss(outputs, target)) < 1e-3  # the two crops are right; digit 2 is missed
    metrics = task.metrics()
    for metric in metrics.values():
        metric.update(outputs, target)
    got = {name: float(metric.compute()) for name, metric in metrics.items()}
    assert got["acc"] == 0.0 and got["count_acc"] == 0.0 and got["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


# ----------------------------------------------------------------------------------------------------------------
# metrics, decoding, text
# ----------------------------------------------------------------------------------------------------------------
def test_set_metrics_on_a_hand_built_batch() -> None:
    task = _task(3)
    target = torch.tensor([[3, 7, -1], [4, -1, -1], [2, 2, 5], [-1, -1, -1], [1, 6, -1]])
    predicted = [
        [7, -1, 3],  # {3, 7}: right
        [4, 4, -1],  # {4, 4}: one too many
        [2, 5, 2],  # {2, 2, 5}: right
        [-1, -1, -1],  # {}: right
        [1, 8, -1],  # {1, 8}: the count is right, the set is not
    ]
    outputs = _sure(predicted)
    decoded = task.decode(outputs)
    assert decoded["prediction"].tolist() == predicted
    assert decoded["probs"].shape == (5,) and (decoded["probs"] > 0.99).all()
    assert decoded["crop_probs"].shape == (5, 3, 11)
    metrics = task.metrics()
    for metric in metrics.values():  # in two updates: the states add up
        metric.update(outputs[:2], target[:2])
        metric.update(outputs[2:], target[2:])
    got = {name: float(metric.compute()) for name, metric in metrics.items()}
    assert got["acc"] == pytest.approx(3 / 5)
    assert got["count_acc"] == pytest.approx(4 / 5)
    # Found: 2 + 1 + 3 + 0 + 1 = 7 of 8 digits; claimed 9 (one 4 and one 8 too many).
    tp, fp, fn = 7, 2, 1
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert [task.format(p) for p in decoded["prediction"]] == ["{3, 7}", "{4, 4}", "{2, 2, 5}", "{}", "{1, 8}"]
    assert task.format(target[0], names=[f"<{d}>" for d in range(10)]) == "{<3>, <7>}"


def test_f1_of_empty_scenes_read_as_empty() -> None:
    task = _task(2)
    metric = task.metrics()["f1"]
    metric.update(_sure([[-1, -1]]), torch.tensor([[-1, -1]]))
    assert float(metric.compute()) == 1.0


def test_the_task_rebuilds_from_its_config_and_checks_its_input() -> None:
    task = SetOfObjects(slots=3, nothing_weight=0.5)
    assert task.config()["init_args"] == {"slots": 3, "nothing_weight": 0.5, "interact": False, "suppress": None}
    again = SetOfObjects.from_config(task.config())
    assert isinstance(again, SetOfObjects) and (again.slots, again.nothing_weight, again.per_object) == (3, 0.5, False)
    assert SetOfObjects().per_object
    with pytest.raises(ValueError, match="slots >= 1"):
        SetOfObjects(slots=0)
    with pytest.raises(ValueError, match="nothing_weight >= 0"):
        SetOfObjects(nothing_weight=-1.0)
    built = _task(3)
    with pytest.raises(ValueError, match=r"expected outputs \(B, 33\)"):
        built.loss(torch.zeros(2, 30), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer targets \(B, D\)"):
        built.loss(torch.zeros(2, 33), torch.zeros(2))


def test_interacting_crops_read_each_other_and_break_ties() -> None:
    torch.manual_seed(0)
    task = SetOfObjects(interact=True)
    task.build(8, 10, 3)
    assert task.config()["init_args"]["interact"] is True
    features = torch.randn(2, 3, 8)
    features[:, 1] = features[:, 0]  # two crops of one object
    out = task(features)
    assert out.shape == (2, 33)
    # What crop 0 reads of the others depends on crop 2: change crop 2 and crop 0's logits change.
    changed = features.clone()
    changed[:, 2] += 1.0
    assert not torch.allclose(task(changed)[:, :11], out[:, :11])
    # Two identical crops get different answers once the transformers' embeddings differ (the tie is broken).
    with torch.no_grad():
        task.mix.embed.copy_(torch.randn(3, 8))
    logits = task.split(task(features))
    assert not torch.allclose(logits[:, 0], logits[:, 1])
    task.loss(task(features), torch.tensor([[3, -1, -1], [1, 2, -1]])).backward()
    assert all(p.grad is not None for p in task.parameters())
    single = SetOfObjects(interact=True)
    single.build(8, 10, 1)  # K = 1: nothing to read, no NaN
    assert torch.isfinite(single(torch.randn(2, 1, 8))).all()
    with pytest.raises(ValueError, match="interact"):
        SetOfObjects(slots=3, interact=True)


def test_keep_distinct_is_greedy_suppression_in_score_order() -> None:
    # Windows 0 and 1 overlap by 0.8, window 2 overlaps 1 by 0.4 and 0 by 0.2, window 3 by 0.9 with 0.
    iou = torch.tensor([[1.0, 0.8, 0.2, 0.9], [0.8, 1.0, 0.4, 0.0], [0.2, 0.4, 1.0, 0.0], [0.9, 0.0, 0.0, 1.0]])
    iou = iou.expand(4, 4, 4)
    score = torch.tensor(
        [
            [0.9, 0.7, 0.6, 0.5],  # 1 and 3 fall to 0; 2 stays (0.4 only with 1, which was dropped)
            [0.7, 0.9, 0.6, 0.5],  # 1 first: 0 falls (0.8), 2 falls (0.4 > 0.3), 3 stays (0 is gone)
            [0.0, 0.7, 0.6, 0.5],  # 0 says "nothing": it suppresses no one and is not kept
            [0.5, 0.5, 0.0, 0.0],  # a tie goes to the lower index
        ]
    )
    keep = keep_distinct(iou, score, 0.3)
    expected = [[1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 0, 1], [1, 0, 0, 0]]
    assert keep.tolist() == [[bool(v) for v in row] for row in expected]
    assert keep_distinct(iou, score, 1.0).tolist() == (score > 0).tolist()  # no overlap above 1: all that answer


def test_suppressed_crops_say_nothing_in_eval_mode_only() -> None:
    torch.manual_seed(0)
    task = SetOfObjects(suppress=0.3)
    task.build(8, 10, 3)
    assert task.uses_regions and task.config()["init_args"]["suppress"] == 0.3
    logits = torch.full((1, 3, 11), -5.0)
    logits[0, 0, 7], logits[0, 1, 7], logits[0, 2, 2] = 4.0, 3.0, 2.0  # crops 0 and 1 read a 7, crop 2 a 2
    regions = _regions([[A, (16.0, 16.0), B]])  # crops 0 and 1 on digit A (10 x 10 windows 2 px apart), 2 on B
    assert region_iou(regions)[0, 0, 1] > 0.5
    out = task.postprocess(logits.flatten(1), regions)
    assert task.decode(out)["prediction"].tolist() == [[7, -1, 2]]
    torch.testing.assert_close(task.split(out)[0, [0, 2]], logits[0, [0, 2]])  # the kept crops are unchanged
    # The classifier applies it in eval mode only: training's loss sees every crop's own answer.
    spec = TransformerSpec(transform=Attention(scale_range=(0.3, 0.6)), num_transformers=3, crop_size=28)
    model = STNClassifier("stn_paper_cnn_st", 10, 1, spec.build(1, SIZE, 0.0), "features", task, input_size=SIZE)
    x = torch.randn(4, 1, *SIZE)
    calls: list[bool] = []
    original = task.postprocess
    task.postprocess = lambda *args: calls.append(model.training) or original(*args)  # type: ignore[method-assign]
    model.train()(x)
    assert calls == []  # training's loss sees every crop's own answer
    model.eval()
    task.uses_regions = False
    raw, _ = model(x)
    task.uses_regions = True
    evaluated, _ = model(x)
    assert calls == [False]
    # The identity start puts the three windows on one place: every crop names the same digit, and in eval mode only
    # one of them answers.
    answering = lambda out: (task.decode(out)["prediction"] >= 0).sum(1).tolist()  # noqa: E731
    assert answering(raw) == [3, 3, 3, 3] and answering(evaluated) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="with slots there are none"):
        SetOfObjects(slots=3, suppress=0.3)
    with pytest.raises(ValueError, match=r"suppress in \(0, 1\]"):
        SetOfObjects(suppress=0.0)


# ----------------------------------------------------------------------------------------------------------------
# co-localisation with absent digits
# ----------------------------------------------------------------------------------------------------------------
SIZE = (64, 64)
NAN = [math.nan] * 4
# Digit boxes of three scenes padded to D = 3: two digits, one digit, none.
BOXES = torch.tensor(
    [
        [[4.0, 6.0, 24.0, 26.0], [40.0, 38.0, 58.0, 60.0], NAN],
        [[4.0, 6.0, 24.0, 26.0], NAN, NAN],
        [NAN, NAN, NAN],
    ]
)


def _regions(centres: list[list[tuple[float, float]]]) -> torch.Tensor:
    # Attention regions of 10 x 10 pixels centred at the given pixels.
    params = [[[10 / 64, (2 * x + 1) / 64 - 1, (2 * y + 1) / 64 - 1] for x, y in row] for row in centres]
    return Attention().outline(torch.tensor(params), SIZE)


A, B, EMPTY = (14.0, 16.0), (49.0, 49.0), (50.0, 10.0)


@pytest.mark.parametrize(
    ("centres", "coloc"),
    [
        ([[A, B, EMPTY], [A, EMPTY, EMPTY], [EMPTY, EMPTY, EMPTY]], [1, 1, 1]),  # each digit under its own
        ([[A, A, EMPTY], [EMPTY, EMPTY, A], [A, B, A]], [0, 1, 1]),  # two on A; the spare ones anywhere
        ([[B, EMPTY, EMPTY], [EMPTY, EMPTY, EMPTY], [A, A, A]], [0, 0, 1]),  # a digit without a transformer
    ],
)
def test_colocalization_counts_only_the_digits_present(centres: list, coloc: list[int]) -> None:
    regions = _regions(centres)
    for row, want in enumerate(coloc):
        metric = CoLocalization(3)
        metric.update(regions[row : row + 1], BOXES[row : row + 1])
        assert metric.compute()["coloc"].item() == want, row
    # hit_k: a NaN box holds no centre.
    metric = CoLocalization(3)
    metric.update(_regions([[EMPTY, EMPTY, A]] * 3), BOXES)
    out = metric.compute()
    assert [out[f"hit_{k}"].item() for k in range(3)] == [0.0, 0.0, pytest.approx(2 / 3)]
    assert out["contains_2"].item() == 0.0  # 10 x 10 regions hold no 20 x 20 digit; NaN corners none either


def test_colocalized_without_absent_objects_is_unchanged() -> None:
    hits = torch.tensor([[[True, True], [False, False]], [[True, True], [True, False]]])
    assert colocalized(hits).tolist() == [False, True]
    assert colocalized(hits, torch.ones(2, 2, dtype=torch.bool)).tolist() == [False, True]
    # Object 1 absent: one transformer on object 0 is enough.
    assert colocalized(hits, torch.tensor([[True, False], [True, False]])).tolist() == [True, True]


# ----------------------------------------------------------------------------------------------------------------
# the scene generator
# ----------------------------------------------------------------------------------------------------------------
def _digits(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digits("test")
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[: n * d].view(n, d)
    return images[index].float() / 255, labels[index]


def test_attributes() -> None:
    dm = DigitScenes()
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.num_digits) == (10, 1, (64, 64), 3)
    assert (dm.min_digits, dm.max_digits, dm.class_names) == (1, 3, tuple("0123456789"))
    assert dm.background == pytest.approx(BACKGROUND)
    assert DigitScenes(canvas=96, min_digits=0, max_digits=5).image_size == (96, 96)


@pytest.mark.parametrize("canvas", [64, 96])
def test_counts_overlaps_and_boxes(canvas: int) -> None:
    dm = DigitScenes(canvas=canvas, min_digits=0, max_digits=3)
    digits, labels = _digits(96, 3)
    params = dm.draw(digits, torch.Generator().manual_seed(0))
    counts = params["counts"]
    assert counts.shape == (96,) and set(counts.tolist()) == {0, 1, 2, 3}
    x = dm.render(digits, params)[:, 0]
    boxes, y = dm.boxes(digits, params), dm.target(labels, params)
    present = torch.arange(3) < counts[:, None]
    # Labels: the drawn digits' classes, -1 for the others; boxes: NaN rows for the others.
    assert y.dtype == torch.int64 and torch.equal(y, torch.where(present, labels, -1))
    assert torch.equal(boxes.isnan().any(-1), ~present) and torch.equal(boxes.isnan().all(-1), ~present)
    # Inside the canvas (pixel edges -0.5 and canvas - 0.5).
    inside = boxes[present]
    assert (inside >= -0.5 - 1e-3).all() and (inside <= canvas - 0.5 + 1e-3).all()
    # Two drawn digits overlap by at most max_overlap of either box.
    overlap = box_overlap(boxes, boxes)
    i, j = torch.triu_indices(3, 3, 1)
    pairs = overlap[:, i, j][present[:, i] & present[:, j]]
    assert len(pairs) > 50 and (pairs <= dm.max_overlap + 1e-4).all()
    # Each drawn digit's ink lies in its box, and nothing else is drawn. Bilinear sampling spreads ink by half a
    # digit pixel, which is 0.5 s canvas pixels at scale s, (|cos a| + |sin a|) times that across the axes of a
    # rotated digit: at most 0.89 pixels at s = 1.3 and 30 degrees.
    tol = 0.9
    grid = torch.arange(canvas).float()
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))  # (B, D, 1, 1) each; NaN rows cover nothing
    covered = (grid >= x0 - tol) & (grid <= x1 + tol)  # (B, D, 1, W)
    covered = (covered & (grid[:, None] >= y0 - tol) & (grid[:, None] <= y1 + tol)).any(1)  # (B, H, W)
    assert not ((x > 1e-4) & ~covered).any()
    assert (x[counts == 0] == 0).all() and (x[counts > 0].amax(dim=(1, 2)) > 0.5).all()
    # Scales and angles vary: box sides spread from small to large.
    sides = (boxes[..., 3] - boxes[..., 1])[present]
    assert float(sides.min()) < 16 and float(sides.max()) > 26


def test_fallback_keeps_the_least_overlap_when_nothing_fits() -> None:
    # Three digits at the largest scale with no overlap allowed in a 32-pixel canvas: they cannot all fit apart,
    # the placement still returns inside the canvas.
    dm = DigitScenes(canvas=32, min_digits=3, scale_range=(1.3, 1.3), max_overlap=0.0)
    digits, _ = _digits(8, 3)
    params = dm.draw(digits, torch.Generator().manual_seed(0))
    assert torch.isfinite(params["theta"]).all()
    assert torch.isfinite(dm.render(digits, params)).all()


def test_clutter_is_pasted_on_top() -> None:
    dm = DigitScenes(num_clutter=4)
    digits, _ = _digits(8, 3)
    params = dm.draw(digits, torch.Generator().manual_seed(0))
    assert params["clutter"].shape == (8, 4, 6, 6) and params["clutter_at"].shape == (8, 4, 2)
    clean = {key: params[key] for key in ("counts", "theta")}
    x, x0 = dm.render(digits, params), dm.render(digits, clean)
    assert (x >= x0).all() and not torch.equal(x, x0)


def test_batches_and_evaluation_sets_fixed_by_the_seed() -> None:
    a, b, c = (DigitScenes(batch_size=16, val_size=16, seed=s) for s in (3, 3, 4))
    for dm in (a, b, c):
        dm.setup("fit")
    raw = next(iter(a.val_dataloader()))
    assert raw["digits"].shape == (16, 3, 28, 28) and raw["counts"].shape == (16,)
    xa, ya, ba = a.on_after_batch_transfer(raw, 0)  # no trainer: an evaluation batch, with boxes
    xb, yb, bb = b.make_batch(next(iter(b.val_dataloader())), train=False, boxes=True)
    xc, _, _ = c.make_batch(next(iter(c.val_dataloader())), train=False, boxes=True)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.allclose(ba, bb, equal_nan=True)
    assert not torch.equal(xa, xc)
    assert xa.shape == (16, 1, 64, 64) and ya.shape == (16, 3) and ba.shape == (16, 3, 4)
    assert torch.equal((ya >= 0).sum(1), raw["counts"])
    # Training: single digits grouped on the device, fresh scenes for every generator.
    train = next(iter(a.train_dataloader()))
    x1, y1 = a.make_batch(train, train=True, generator=torch.Generator().manual_seed(0))
    x2, _ = a.make_batch(train, train=True, generator=torch.Generator().manual_seed(1))
    assert x1.shape == (16, 1, 64, 64) and y1.shape == (16, 3) and not torch.equal(x1, x2)
    assert torch.equal(y1[:, 0], train["labels"][:, 0])  # compose keeps each sample's own digit first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"canvas": 16}, r"expected canvas >= 32 pixels, got 16"),
        ({"max_digits": 0}, r"expected max_digits >= 1, got 0"),
        ({"min_digits": 4}, r"expected 0 <= min_digits <= max_digits \(3\), got 4"),
        ({"scale_range": (1.2, 0.6)}, r"expected scale_range as \(low, high\)"),
        ({"max_angle": 200.0}, r"expected 0 <= max_angle <= 180 degrees"),
        ({"max_overlap": 1.5}, r"expected 0 <= max_overlap <= 1"),
        ({"num_clutter": -1}, r"expected num_clutter >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DigitScenes(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# models and the module
# ----------------------------------------------------------------------------------------------------------------
def test_slot_heads_read_the_whole_image() -> None:
    model = STNClassifier("stn_paper_cnn", 10, 1, fusion="none", task=SetOfObjects(slots=3), input_size=(64, 64))
    x = torch.randn(2, 1, 64, 64)
    outputs, params = model(x)
    assert outputs.shape == (2, 3 * 11) and params is None
    model.task.loss(outputs, torch.tensor([[1, 2, -1], [-1, -1, -1]])).backward()
    # A task that reads one object per crop still needs crops.
    for task in (SetOfObjects(), SumOfObjects(object_classes=10)):
        with pytest.raises(ValueError, match="reads one object per crop: it needs transformers"):
            STNClassifier("stn_paper_cnn", 19, 1, fusion="none", task=task)


def test_module_trains_on_scenes_and_logs_the_set_metrics(quiet_trainer: Callable[..., pl.Trainer]) -> None:
    pl.seed_everything(0)
    dm = DigitScenes(min_digits=0, max_digits=2, batch_size=4, val_size=4)
    module = STNModule.for_data(
        dm,
        backbone="stn_paper_cnn_st",
        # more transformers than digits
        transformer=TransformerSpec(
            transform=Attention(scale_range=(0.3, 0.6)), num_transformers=3, crop_size=28, init="tiled"
        ),
        fusion="features",
        task=SetOfObjects(),
    )
    trainer = quiet_trainer(fast_dev_run=1)
    trainer.fit(module, dm)
    assert trainer.global_step == 1 and trainer.callback_metrics["train/loss"].isfinite()
    trainer.test(module, dm, verbose=False)
    logged = trainer.callback_metrics
    for key in ("test/acc", "test/count_acc", "test/f1", "test/coloc", "test/hit_2"):
        assert key in logged and logged[key].isfinite(), key
