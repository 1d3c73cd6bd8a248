"""DataModules, bundled digits and distortions: shapes, labels, fixed evaluation sets, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from stn_lightning.data import (
    ClutteredMNIST,
    DistortedMNIST,
    ImageFolderDataModule,
    MNISTAddition,
    MNISTDataModule,
    MultiMNIST,
    load_digits,
)
from stn_lightning.data import distortions as dist
from stn_lightning.kernels import tps_target_points

BATCH = 16
BACKGROUND = -0.1307 / 0.3081


def _factories() -> dict[str, object]:
    return {
        "plain": lambda **kw: MNISTDataModule(**kw),
        "R": lambda **kw: DistortedMNIST("R", **kw),
        "RTS": lambda **kw: DistortedMNIST("RTS", **kw),
        "P": lambda **kw: DistortedMNIST("P", **kw),
        "E": lambda **kw: DistortedMNIST("E", **kw),
        "cluttered": lambda **kw: ClutteredMNIST(**kw),
        "addition": lambda **kw: MNISTAddition(**kw),
        "multi2": lambda **kw: MultiMNIST(2, **kw),
        "multi3": lambda **kw: MultiMNIST(3, **kw),
    }


# name -> (num_classes, in_chans, image_size)
PROMISES = {
    "plain": (10, 1, (28, 28)),
    "R": (10, 1, (28, 28)),
    "RTS": (10, 1, (42, 42)),
    "P": (10, 1, (28, 28)),
    "E": (10, 1, (28, 28)),
    "cluttered": (10, 1, (60, 60)),
    "addition": (19, 2, (42, 42)),
    "multi2": (19, 1, (64, 64)),
    "multi3": (28, 1, (64, 64)),
}


def make(name: str, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("batch_size", BATCH)
    return _factories()[name](**kw)


def first(loader):  # type: ignore[no-untyped-def]
    return next(iter(loader))


# ----------------------------------------------------------------------------------------------------------------
# bundled digits
# ----------------------------------------------------------------------------------------------------------------
def test_bundled_split_sizes_and_stratification() -> None:
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    assert train_x.shape == (4000, 28, 28) and test_x.shape == (1000, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert torch.bincount(train_y).tolist() == [400] * 10
    assert torch.bincount(test_y).tolist() == [100] * 10
    # The split is fixed: loading again gives the same digits; train and test share no image.
    assert torch.equal(load_digits("test")[0], test_x)
    train_rows = {bytes(row) for row in train_x.reshape(4000, -1).numpy()}
    assert sum(bytes(row) in train_rows for row in test_x.reshape(1000, -1).numpy()) == 0


def test_validation_is_carved_from_train() -> None:
    dm = MNISTDataModule(val_size=300)
    dm.setup("fit")
    assert len(dm.train_set) == 3700 and len(dm.val_set) == 300
    dm.setup("test")
    assert len(dm.test_set) == 1000
    train_x, _ = load_digits("train")
    all_rows = {bytes(row) for row in train_x.reshape(4000, -1).numpy()}
    fit_rows = {bytes(row) for row in dm.train_set.digits.reshape(3700, -1).numpy()}
    val_rows = [bytes(row) for row in dm.val_set.digits.reshape(300, -1).numpy()]
    assert all(row in all_rows for row in val_rows)
    assert not any(row in fit_rows for row in val_rows)


# ----------------------------------------------------------------------------------------------------------------
# promises of every DataModule
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROMISES))
def test_attributes_before_setup(name: str) -> None:
    dm = make(name)
    num_classes, in_chans, size = PROMISES[name]
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (num_classes, in_chans, size)
    assert dm.background == pytest.approx(BACKGROUND)
    assert len(dm.mean) == len(dm.std) == in_chans
    assert dm.train_set is None  # nothing read in __init__


@pytest.mark.parametrize("name", list(PROMISES))
def test_batches_have_promised_shapes(name: str) -> None:
    dm = make(name)
    dm.setup("fit")
    num_classes, in_chans, size = PROMISES[name]
    for raw, train in ((first(dm.train_dataloader()), True), (first(dm.val_dataloader()), False)):
        x, y = dm.make_batch(raw, train=train, generator=torch.Generator().manual_seed(0))
        assert x.dtype == torch.float32 and x.shape == (BATCH, in_chans, *size)
        assert y.dtype == torch.int64 and y.shape == (BATCH,)
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
        assert torch.isfinite(x).all()
        # Pixels in [0, 1] before normalisation, and some ink in every image.
        assert float(x.min()) >= BACKGROUND - 1e-5 and float(x.max()) <= (1 - 0.1307) / 0.3081 + 1e-5
        assert (x.amax(dim=(1, 2, 3)) > 0).all()
    # Labels of a single-digit evaluation batch are the digit labels.
    raw = first(dm.val_dataloader())
    _, y = dm.make_batch(raw, train=False)
    assert torch.equal(y, raw["labels"].sum(1))


def test_empty_canvas_equals_background() -> None:
    dm = ClutteredMNIST(num_clutter=0, batch_size=BATCH)
    dm.setup("fit")
    x, _ = dm.make_batch(first(dm.val_dataloader()), train=False)
    empty = torch.isclose(x, torch.tensor(BACKGROUND), atol=1e-6, rtol=0)
    # A 28x28 digit covers at most 784 / 3600 of the canvas: the rest is exactly the background.
    assert empty.float().mean(dim=(1, 2, 3)).min() > 1 - 784 / 3600


def test_multimnist_digits_in_separate_cells_and_label_is_sum() -> None:
    dm = MultiMNIST(num_digits=2, batch_size=BATCH)
    dm.setup("fit")
    raw = first(dm.val_dataloader())
    assert raw["digits"].shape == (BATCH, 2, 28, 28)
    x, y = dm.make_batch(raw, train=False)
    assert torch.equal(y, raw["labels"].sum(1))
    quadrants = x.unfold(2, 32, 32).unfold(3, 32, 32).reshape(BATCH, 4, 32 * 32)
    inked = (quadrants > BACKGROUND + 1e-4).any(-1).sum(-1)
    assert (inked == 2).all()  # two digits, each in its own quadrant, two quadrants empty
    # Each digit alone gives its own quadrant: the maximum of the two renders is the composite.
    one = dict(raw, digits=raw["digits"] * torch.tensor([1, 0], dtype=torch.uint8).view(1, 2, 1, 1))
    two = dict(raw, digits=raw["digits"] * torch.tensor([0, 1], dtype=torch.uint8).view(1, 2, 1, 1))
    x1, _ = dm.make_batch(one, train=False)
    x2, _ = dm.make_batch(two, train=False)
    assert torch.allclose(torch.maximum(x1, x2), x, atol=1e-6)
    assert ((x1 > BACKGROUND + 1e-4) & (x2 > BACKGROUND + 1e-4)).sum() == 0


def test_addition_label_is_sum_of_placed_digits() -> None:
    dm = MNISTAddition(batch_size=BATCH)
    dm.setup("fit")
    raw = first(dm.val_dataloader())
    x, y = dm.make_batch(raw, train=False)
    assert torch.equal(y, raw["labels"][:, 0] + raw["labels"][:, 1])
    # Channel k shows digit k: removing digit 1 empties channel 1 and leaves channel 0 as it was.
    blank = dict(raw, digits=raw["digits"].clone())
    blank["digits"][:, 1] = 0
    xb, _ = dm.make_batch(blank, train=False)
    assert torch.equal(xb[:, 0], x[:, 0])
    assert torch.allclose(xb[:, 1], torch.full_like(xb[:, 1], BACKGROUND), atol=1e-6)
    assert not torch.allclose(x[:, 1], xb[:, 1])
    # Training: single digits are paired within the batch; the label is the sum of the two paired digits.
    train = first(dm.train_dataloader())
    digits = train["digits"].float() / 255
    paired, labels = dm.compose(digits, train["labels"], torch.Generator().manual_seed(0))
    assert paired.shape == (BATCH, 2, 28, 28) and torch.equal(paired[:, 0], digits[:, 0])
    for i in range(BATCH):
        j = int((digits[:, 0] == paired[i, 1]).all(-1).all(-1).nonzero()[0])
        assert labels[i, 1] == train["labels"][j, 0]
    _, y_train = dm.make_batch(train, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y_train, labels.sum(1))


# ----------------------------------------------------------------------------------------------------------------
# fixed evaluation sets, fresh training distortions
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["RTS", "cluttered", "addition"])
def test_validation_identical_across_instances(name: str) -> None:
    a, b, c = make(name, seed=3), make(name, seed=3), make(name, seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    xa, ya = a.make_batch(first(a.val_dataloader()), train=False)
    xb, yb = b.make_batch(first(b.val_dataloader()), train=False)
    xc, _ = c.make_batch(first(c.val_dataloader()), train=False)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    # The test set too, and on_after_batch_transfer without a trainer uses the stored distortions.
    a.setup("test")
    b.setup("test")
    ta = a.on_after_batch_transfer(first(a.test_dataloader()), 0)
    tb = b.on_after_batch_transfer(first(b.test_dataloader()), 0)
    assert torch.equal(ta[0], tb[0])


@pytest.mark.parametrize("name", ["R", "RTS", "P", "E", "cluttered", "multi2"])
def test_training_batches_differ_between_calls(name: str) -> None:
    dm = make(name)
    dm.setup("fit")
    raw = first(dm.train_dataloader())
    x1, y1 = dm.make_batch(raw, train=True)
    x2, y2 = dm.make_batch(raw, train=True)
    assert not torch.equal(x1, x2)
    if dm.num_digits == 1:
        assert torch.equal(y1, y2)


def test_on_after_batch_transfer_follows_trainer_state() -> None:
    import pytorch_lightning as pl

    seen: dict[str, list[tuple[int, ...]]] = {"train": [], "val": []}

    class Probe(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(42 * 42, 10)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            seen["train"].append(tuple(x.shape))
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen["val"].append(tuple(batch[0].shape))

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = DistortedMNIST("RTS", batch_size=8, val_size=16)
    trainer = pl.Trainer(
        accelerator="cpu", fast_dev_run=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(Probe(), datamodule=dm)
    assert seen["train"] == [(8, 1, 42, 42)] * 2 and seen["val"] == [(8, 1, 42, 42)] * 2

    class Fake:
        training = True
        global_rank = 0

    raw = first(dm.val_dataloader())
    stored, _ = dm.make_batch(raw, train=False)
    assert torch.equal(dm.on_after_batch_transfer(raw, 0)[0], stored)  # trainer no longer training
    dm.trainer = Fake()  # type: ignore[assignment]
    assert not torch.equal(dm.on_after_batch_transfer(raw, 0)[0], stored)


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_missing_torchvision_folder(tmp_path, source: str, folder: str) -> None:  # type: ignore[no-untyped-def]
    dm = MNISTDataModule(source=source, root=str(tmp_path))
    dm.prepare_data()  # download=False: nothing is fetched
    assert not any(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "--data.init_args.download true" in message and "download=True" in message
    assert str(tmp_path / folder / "raw") in message and "train-images-idx3-ubyte" in message


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"expected variant in .*got 'X'"):
        DistortedMNIST("X")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected num_digits in \(2, 3\), got 4"):
        MultiMNIST(4)
    with pytest.raises(ValueError, match=r"expected 1 <= val_size < 4000 .*got 4000"):
        MNISTDataModule(val_size=4000)
    with pytest.raises(ValueError, match=r"expected source in .*got 'svhn'"):
        MNISTDataModule(source="svhn")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# distortions
# ----------------------------------------------------------------------------------------------------------------
def test_identity_placement_reproduces_the_digit() -> None:
    digits = load_digits("test")[0][:4, None].float() / 255
    theta = dist.placement_theta(torch.zeros(4), torch.ones(4), torch.zeros(4, 2), canvas=28)
    assert torch.allclose(dist.warp_affine(digits, theta, 28), digits, atol=1e-5)
    # Centred in a 56 canvas: the digit sits unchanged in the middle 28x28.
    theta = dist.placement_theta(torch.zeros(4), torch.ones(4), torch.zeros(4, 2), canvas=56)
    out = dist.warp_affine(digits, theta, 56)
    assert torch.allclose(out[..., 14:42, 14:42], digits, atol=1e-5) and out.sum() == pytest.approx(digits.sum())


def test_rts_keeps_the_scaled_digit_inside_the_canvas() -> None:
    ones = torch.ones(64, 1, 28, 28)
    theta = dist.random_rts(64, max_angle=0.0, generator=torch.Generator().manual_seed(1))
    scale = (42 / 28) / theta[:, :, :2].det().sqrt()
    assert float(scale.min()) >= 0.7 - 1e-5 and float(scale.max()) <= 1.2 + 1e-5
    mass = dist.warp_affine(ones, theta, 42).sum(dim=(1, 2, 3))
    # The whole box lands in the canvas: its area in canvas pixels is (28 s)^2.
    assert torch.allclose(mass, (28 * scale) ** 2, rtol=0.02)
    angles = torch.atan2(theta[:, 0, 1], theta[:, 0, 0])
    rot = dist.random_rotation(256, generator=torch.Generator().manual_seed(2))
    rot_angles = torch.atan2(rot[:, 0, 1], rot[:, 0, 0]).abs()
    assert float(angles.abs().max()) < 1e-6 and math.pi / 2 * 0.9 < float(rot_angles.max()) <= math.pi / 2 + 1e-6


def test_homography_maps_points_and_projective_is_seeded() -> None:
    src = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]])
    dst = torch.tensor([[[-0.8, -0.9], [0.7, -1.0], [0.9, 0.8], [-1.0, 0.6]]])
    h = dist.homography_from_points(src, dst)
    uvw = torch.cat([src, torch.ones(1, 4, 1)], -1) @ h.transpose(-1, -2)
    assert torch.allclose(uvw[..., :2] / uvw[..., 2:], dst, atol=1e-5)
    a = dist.random_projective(8, generator=torch.Generator().manual_seed(5))
    b = dist.random_projective(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, torch.eye(3).expand(8, 3, 3), atol=1e-3)
    cp = dist.random_elastic(8, generator=torch.Generator().manual_seed(5))
    offsets = cp - tps_target_points(4)
    assert cp.shape == (8, 16, 2) and 0 < float(offsets.abs().max()) <= 0.3 + 1e-6


def test_clutter_pieces_come_from_other_digits_and_paste_exactly() -> None:
    digits = torch.arange(5.0).view(5, 1, 1).expand(5, 28, 28)
    source, cut, paste = dist.random_clutter(
        5, 5, num_pieces=20, exclude=torch.arange(5), generator=torch.Generator().manual_seed(0)
    )
    assert (source != torch.arange(5)[:, None]).all()
    pieces = dist.cut_patches(digits, source, cut)
    assert torch.equal(pieces[..., 0, 0], source.float())
    canvas = dist.paste_patches(torch.zeros(1, 10, 10), torch.ones(1, 1, 6, 6), torch.tensor([[[2, 3]]]))
    assert canvas.sum() == 36 and canvas[0, 2:8, 3:9].min() == 1


# ----------------------------------------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------------------------------------
def _write_folder(root, classes: list[str], splits: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    for split, count in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                array = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
                Image.fromarray(array).save(folder / f"{i}.png")


def test_image_folder_datamodule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _write_folder(tmp_path, ["ant", "bee", "cat"], {"train": 3, "test": 2})
    # A test split without one class keeps the training indices.
    for png in (tmp_path / "test" / "ant").iterdir():
        png.unlink()
    dm = ImageFolderDataModule(str(tmp_path), num_classes=3, input_size=32, batch_size=4, num_workers=0)
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.background) == (3, 3, (32, 32), 0.0)
    assert dm.mean == pytest.approx((0.485, 0.456, 0.406))
    assert dm.class_names == ("ant", "bee", "cat")  # the folders' names, known before setup too
    dm.setup("fit")
    assert dm.class_names == ("ant", "bee", "cat")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 4  # val falls back to test/
    x, y = first(dm.train_dataloader())
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 3
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 32, 32) and sorted(yv.tolist()) == [1, 1, 2, 2]


def test_image_folder_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = ImageFolderDataModule(str(tmp_path / "cub"), num_classes=200, input_size=32)
    with pytest.raises(FileNotFoundError, match=r"train.*<class>.*train_test_split\.txt"):
        missing.setup("fit")
    _write_folder(tmp_path / "cub", ["a", "b", "c"], {"train": 1, "val": 1})
    with pytest.raises(ValueError, match=r"expected 200 class folders .*got 3"):
        missing.setup("fit")
    with pytest.raises(ValueError, match=r"expected a timm model name"):
        ImageFolderDataModule(str(tmp_path), num_classes=3, backbone="no_such_net")


def test_evaluation_sampler_gives_each_sample_to_one_rank() -> None:
    from types import SimpleNamespace

    from stn_lightning.data.sampling import evaluation_sampler

    data = list(range(10))

    def trainer(replicas: int, rank: int, wanted: bool = True) -> SimpleNamespace:
        kwargs = {"num_replicas": replicas, "rank": rank} if replicas > 1 else None
        return SimpleNamespace(
            distributed_sampler_kwargs=kwargs, _accelerator_connector=SimpleNamespace(use_distributed_sampler=wanted)
        )

    # One process, no trainer, or the user's use_distributed_sampler=False: the DataLoader's own order.
    assert evaluation_sampler(data, None) is None
    assert evaluation_sampler(data, trainer(1, 0)) is None
    assert evaluation_sampler(data, trainer(3, 0, wanted=False)) is None
    # 10 samples on 3 ranks: 4 + 3 + 3, every index once (DistributedSampler would give 4 + 4 + 4, two repeated).
    shards = [list(evaluation_sampler(data, trainer(3, r)) or []) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert sorted(i for s in shards for i in s) == data
