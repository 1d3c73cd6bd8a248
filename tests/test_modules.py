"""Transforms, localisation nets, SpatialTransformer, the classifier's fusions and the LightningModule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from stn_lightning.localization import PaperLocalizer, TimmLocalizer, create_timm_model
from stn_lightning.model import STNClassifier
from stn_lightning.module import STNModule
from stn_lightning.recipe import LocalizationTraining
from stn_lightning.tasks import Classification, SumOfObjects, Task
from stn_lightning.transformer import SpatialTransformer, TransformerSpec
from stn_lightning.transforms import (
    Affine,
    Attention,
    Projective,
    Similarity,
    ThinPlateSpline,
    Transform,
    Translation,
    tiled_windows,
)

FAMILIES = [Affine(), Attention(), Similarity(), Translation(), Projective(), ThinPlateSpline()]
BOUNDED = [Affine(translation_range=1.0), Attention((0.2, 1.5), 1.0), Similarity((0.5, 2.0), 0.8), Translation(0.5)]
IDS = [type(t).__name__ for t in FAMILIES]


@pytest.mark.parametrize("transform", FAMILIES + BOUNDED)
@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_parameters_reproduce_the_input(transform: Transform, align_corners: bool) -> None:
    x = torch.randn(2, 3, 13, 10)
    raw = transform.inverse(transform.identity()).expand(2, 2, -1)
    params = transform(raw)
    torch.testing.assert_close(params[0, 0], transform.identity(), atol=1e-6, rtol=0)
    crops = transform.sample(x, transform.identity().expand(2, 2, -1), (13, 10), align_corners=align_corners)
    # To float32 rounding: CPU tensors run kernels.torch_path (F.grid_sample), exact only to the rounding of the
    # normalised coordinates; kernels.reference is bit exact (tests/test_reference.py).
    torch.testing.assert_close(crops, x.unsqueeze(1).expand_as(crops), atol=5e-5, rtol=0)


@pytest.mark.parametrize("transform", FAMILIES, ids=IDS)
def test_parameter_counts_and_outline_of_identity(transform: Transform) -> None:
    assert transform.identity().shape == (transform.num_params,)
    outline = transform.outline(transform.identity().expand(1, 1, -1), (20, 30))
    assert outline.shape[-1] == 2
    # The identity reads the whole image: its outline runs along the outer pixel edges.
    assert outline[..., 0].min().item() == pytest.approx(-0.5, abs=1e-4)
    assert outline[..., 0].max().item() == pytest.approx(29.5, abs=1e-4)
    assert outline[..., 1].max().item() == pytest.approx(19.5, abs=1e-4)
    stats = transform.statistics(transform.identity().expand(4, 2, -1), (20, 30))
    assert stats["scale"].item() == pytest.approx(1.0, abs=1e-4)
    assert stats["outside"].item() == 0.0


def test_bounded_mappings_stay_in_range() -> None:
    att = Attention(scale_range=(0.2, 1.5), translation_range=0.7)
    params = att(1e3 * torch.randn(100, 3))
    assert params[:, 0].min() >= 0.2 and params[:, 0].max() <= 1.5
    assert params[:, 1:].abs().max() <= 0.7
    with pytest.raises(ValueError, match="scale range"):
        Attention(scale_range=(1.2, 0.5))


def test_similarity_rotation_stays_a_rotation_on_non_square_images() -> None:
    sim = Similarity()
    params = torch.tensor([[[0.5, math.radians(30), 0.1, -0.2]]])
    poly = sim.outline(params, (20, 60), per_side=1)[0, 0]  # corners in pixels
    e1, e2 = poly[1] - poly[0], poly[2] - poly[1]
    # Adjacent sides are perpendicular in pixels and the first side is rotated by 30 degrees.
    assert torch.dot(e1, e2).abs() < 1e-3 * e1.norm() * e2.norm()
    assert math.degrees(math.atan2(e1[1], e1[0])) == pytest.approx(30.0, abs=1e-3)


def test_attention_window_crops_the_right_region() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # Scale 0.5 centred on the top-left quadrant: a 2 x 2 crop of it is exactly those four pixels.
    crop = Attention().sample(x, torch.tensor([[[0.5, -0.5, -0.5]]]), (2, 2))
    assert torch.equal(crop[0, 0, 0], torch.tensor([[0.0, 1.0], [4.0, 5.0]]))


def test_tiled_windows_cover_the_image() -> None:
    windows = tiled_windows(Attention(), 4)
    assert torch.allclose(windows[:, 0], torch.full((4,), 0.5))
    assert {tuple(w[1:].tolist()) for w in windows} == {(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)}


@pytest.mark.parametrize("size", [16, 37])
def test_paper_localizer_takes_any_size_from_16(size: int) -> None:
    loc = PaperLocalizer(2)
    assert loc(torch.randn(3, 2, size, size + 5)).shape == (3, loc.out_features)
    with pytest.raises(ValueError, match="at least 16"):
        loc(torch.randn(1, 2, 15, 20))
    with pytest.raises(ValueError, match="2 input channels"):
        loc(torch.randn(1, 3, 20, 20))


@pytest.mark.parametrize("size", [32, 45])
def test_timm_localizer_at_two_sizes(size: int) -> None:
    loc = TimmLocalizer(1, "test_resnet", hidden=16)
    assert loc(torch.randn(2, 1, size, size)).shape == (2, 16)


def test_unknown_timm_name_lists_close_names() -> None:
    with pytest.raises(ValueError, match="closest valid names: .*resnet18"):
        create_timm_model("resnet_18")


@pytest.mark.parametrize("transform", FAMILIES, ids=IDS)
def test_spatial_transformer_with_three_heads(transform: Transform) -> None:
    st = SpatialTransformer(PaperLocalizer(1), transform, 3, (12, 14), background=-0.4)
    x = torch.randn(5, 1, 30, 30, requires_grad=True)
    crops, params = st(x)
    assert crops.shape == (5, 3, 1, 12, 14) and crops.is_contiguous()
    assert params.shape == (5, 3, transform.num_params)
    # Zero weights and identity bias: every transformer starts at the identity for every image.
    assert torch.allclose(params, transform.identity().expand(5, 3, -1), atol=1e-6)
    (crops.sum() + params.sum()).backward()
    assert st.head.weight.grad is not None and x.grad is not None


def test_feature_norm_lets_the_warps_depend_on_the_image() -> None:
    # The reason for feature_norm (see SpatialTransformer): on real digits a fresh localiser's features barely
    # vary from image to image, so a gradient step on the head mostly moves one warp shared by all images (the
    # bias) and hardly makes the warps differ between images. Standardising the features must turn the same
    # step into warps that differ between images far more than their mean moves.
    from stn_lightning.data.digits import load_digits

    images, _ = load_digits("train")
    x = (images[:64, None].float() / 255 - 0.1307) / 0.3081
    target = torch.randn(64, 1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ratios = {}
    for norm in (False, True):
        torch.manual_seed(0)
        st = SpatialTransformer(PaperLocalizer(1), Affine(), 1, 28, feature_norm=norm)
        ((st(x).crops - target) ** 2).mean().backward()
        with torch.no_grad():
            for p in st.head.parameters():
                p -= 0.01 * p.grad
            params = st(x).params
        spread = params.std(0).mean()  # how much the warps differ between images
        shift = (params.mean(0) - Affine().identity()).abs().mean()  # how far the shared warp moved
        ratios[norm] = float(spread / shift)
    assert ratios[True] > 5 * ratios[False], ratios  # measured: 0.85 against 0.09


def test_padding_takes_the_background_value() -> None:
    bg = -0.4242
    st = SpatialTransformer(PaperLocalizer(1), Attention(), 1, 20, background=bg)
    x = torch.full((1, 1, 20, 20), bg)
    crop = st.sample(x, torch.tensor([[[3.0, 0.0, 0.0]]]))  # zoomed out: mostly padding
    torch.testing.assert_close(crop, torch.full_like(crop, bg))


def test_tiled_init_places_windows() -> None:
    st = SpatialTransformer(PaperLocalizer(3), Attention(scale_range=(0.1, 1.2)), 4, 8, init="tiled")
    _, params = st(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(params[0], tiled_windows(Attention(), 4), atol=1e-4, rtol=0)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="num_transformers >= 1"):
        SpatialTransformer(PaperLocalizer(1), Affine(), 0, 8)
    with pytest.raises(ValueError, match="output size"):
        SpatialTransformer(PaperLocalizer(1), Affine(), 1, 0)
    with pytest.raises(ValueError, match="at least 16"):
        STNModule(image_size=12)
    with pytest.raises(ValueError, match="fusion"):
        STNClassifier("test_resnet", 10, 1, None, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one object per crop"):
        STNModule(
            image_size=16, transformer=TransformerSpec(num_transformers=2), fusion="channels", task=SumOfObjects()
        )
    with pytest.raises(ValueError, match="one object per crop"):
        STNModule(image_size=16, fusion="none", task=SumOfObjects())


@pytest.mark.parametrize(
    ("fusion", "k", "backbone_chans"), [("channels", 2, 2 * 2), ("features", 3, 2), ("none", 1, 2)]
)
def test_each_fusion(fusion: str, k: int, backbone_chans: int) -> None:
    module = STNModule(
        num_classes=19,
        in_chans=2,
        image_size=(24, 20),
        backbone="test_resnet",
        transformer=TransformerSpec(num_transformers=k),
        fusion=fusion,  # type: ignore[arg-type]
    )
    logits, params = module.model(torch.randn(3, 2, 24, 20))
    assert logits.shape == (3, 19)
    first_conv = next(m for m in module.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == backbone_chans
    if fusion == "none":
        assert params is None and module.transformer is None
    else:
        assert params is not None and params.shape == (3, k, 6)
    with pytest.raises(ValueError, match="expected images"):
        module.model(torch.randn(3, 1, 24, 20))


@pytest.mark.parametrize("fusion", ["none", "channels", "features"])
def test_unpooled_backbone_gives_a_position_sensitive_head(fusion: str) -> None:
    # global_pool="" keeps the backbone's feature map; the head's width is measured on the size the backbone sees
    # (the whole image without transformer, the crop with one) and must be C x h x w (x K for feature fusion).
    module = STNModule(
        num_classes=10,
        in_chans=1,
        image_size=(80, 72),
        backbone="test_resnet",
        transformer=TransformerSpec(num_transformers=2, crop_size=64),
        fusion=fusion,  # type: ignore[arg-type]
        backbone_kwargs={"global_pool": ""},
    )
    net = module.model.backbone
    seen = (80, 72) if fusion == "none" else (64, 64)
    chans = 2 if fusion == "channels" else 1
    with torch.no_grad():
        feature_map = net.eval().forward_features(torch.zeros(1, chans, *seen))
    net.train()
    assert feature_map.shape[-2:] != (1, 1)  # a map, not a pooled vector
    k = 2 if fusion == "features" else 1
    assert module.task.head.in_features == feature_map[0].numel() * k
    assert module(torch.randn(3, 1, 80, 72)).shape == (3, 10)


def test_feature_norm_refuses_a_training_batch_of_one_image_with_a_clear_error() -> None:
    st = SpatialTransformer(PaperLocalizer(1), Affine(), 1, 28, feature_norm=True)
    with pytest.raises(ValueError, match="batch of one image"):
        st(torch.randn(1, 1, 28, 28))
    st.eval()  # evaluation uses the running statistics: one image is fine
    assert st(torch.randn(1, 1, 28, 28)).crops.shape == (1, 1, 1, 28, 28)


def test_localisation_learning_rate_is_scaled() -> None:
    module = STNModule(
        backbone="test_resnet",
        localization=LocalizationTraining(lr_scale=0.1, optimizer=None),  # one optimiser, the localiser at a tenth
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
    )
    config = module.configure_optimizers()
    groups = config["optimizer"].param_groups
    assert [g["name"] for g in groups] == ["model", "localization"]
    assert [g["lr"] for g in groups] == pytest.approx([0.05, 0.005])
    assert sum(p.numel() for p in groups[1]["params"]) == sum(p.numel() for p in module.transformer.parameters())  # type: ignore[union-attr]
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in module.parameters())


def test_the_default_recipe_trains_the_localiser_with_adam_and_clips_its_gradient() -> None:
    module = STNModule(
        backbone="test_resnet",
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10),
    )
    assert module.localization.grad_clip == 1.0
    assert isinstance(module.transformer.feature_norm, torch.nn.BatchNorm1d)  # type: ignore[union-attr]
    optimizer = module.configure_optimizers()["optimizer"]
    (sgd,), (adam,) = ([g for g in optimizer.param_groups if g["name"] == name] for name in ("model", "localization"))
    assert sgd["lr"] == 0.05 and "momentum" in sgd
    assert adam["lr"] == pytest.approx(1e-3) and "betas" in adam  # Adam's own rate, whatever trains the rest
    loc = {id(p) for p in module.transformer.parameters()}  # type: ignore[union-attr]
    assert {id(p) for p in adam["params"]} == loc and not loc & {id(p) for p in sgd["params"]}


class _RecordingSGD(torch.optim.SGD):
    """SGD that records each parameter group's gradient norm as it steps, i.e. after Lightning's clipping."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.norms: list[dict[str, float]] = []

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None  # forward, backward, then configure_gradient_clipping
        self.norms.append(
            {
                g["name"]: math.sqrt(sum(float(p.grad.square().sum()) for p in g["params"] if p.grad is not None))
                for g in self.param_groups
            }
        )
        super().step()
        return loss


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_loc_grad_clip_clips_only_the_localisation_group(clip: float | None) -> None:
    torch.manual_seed(0)
    optimizers: list[_RecordingSGD] = []

    def make_optimizer(params: Any) -> _RecordingSGD:
        optimizers.append(_RecordingSGD(params, lr=0.01))
        return optimizers[-1]

    module = STNModule(
        backbone="test_resnet",
        image_size=32,
        localization=LocalizationTraining(grad_clip=clip, optimizer=None),
        optimizer=make_optimizer,
    )
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,)))
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    norms = optimizers[0].norms
    assert len(norms) == 2
    assert all(n["model"] > 1e-2 for n in norms)  # the classifier's gradient is never clipped
    if clip is None:
        assert all(n["localization"] > 10 * 1e-3 for n in norms)  # so that the clipped case below means something
    else:
        assert all(0 < n["localization"] <= clip * (1 + 1e-4) for n in norms)
    assert "train/loc_grad_norm" in trainer.callback_metrics


def test_loc_grad_clip_must_be_positive() -> None:
    with pytest.raises(ValueError, match="grad_clip"):
        LocalizationTraining(grad_clip=0.0)


def test_pretrained_weights_come_from_a_local_file(tmp_path: Path) -> None:
    source = create_timm_model("test_resnet", num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_timm_model("test_resnet", pretrained=str(path), num_classes=0)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh = create_timm_model("test_resnet", num_classes=0)
    pairs = zip(source.state_dict().values(), fresh.state_dict().values(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)


def test_statistics_report_the_rotation() -> None:
    import math

    from stn_lightning.transforms import Affine

    family = Affine()
    a = math.radians(30.0)
    theta = torch.tensor([math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0]).view(1, 1, 6)
    assert family.statistics(family.identity().view(1, 1, 6), (42, 42))["rotation"].item() == pytest.approx(0.0)
    assert family.statistics(theta, (42, 42))["rotation"].item() == pytest.approx(30.0, abs=1e-3)


def test_pretrained_true_asks_timm_for_its_published_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import timm

    from stn_lightning.localization import create_timm_model

    calls: list[dict] = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: calls.append({"name": name, **kw}) or "model")
    assert create_timm_model("resnet18", pretrained=True, num_classes=0) == "model"
    assert calls == [{"name": "resnet18", "pretrained": True, "num_classes": 0}]  # timm downloads, not us
    with pytest.raises(ValueError, match="no such file"):
        create_timm_model("resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_a_transformer_spec_builds_the_transformer_from_the_data() -> None:
    from stn_lightning.transforms import Attention

    spec = TransformerSpec(transform=Attention(), num_transformers=2, crop_size=20, mode="nearest")
    module = STNModule(image_size=42, background=-0.4, fusion="features", transformer=spec)
    mine = module.transformer
    assert mine is not None and mine.background == -0.4 and mine.mode == "nearest" and mine.output_size == (20, 20)
    assert mine.transform is not spec.transform  # each module its own copy: the spec stays reusable
    assert module(torch.randn(3, 1, 42, 42)).shape == (3, 10)
    assert STNModule(image_size=42, fusion="none", transformer=spec).transformer is None
    with pytest.raises(ValueError, match="num_transformers"):
        TransformerSpec(num_transformers=0)


def test_load_from_checkpoint_rebuilds_a_projective_transformer(tmp_path: Path) -> None:
    from stn_lightning.transforms import Projective

    torch.manual_seed(0)
    spec = TransformerSpec(transform=Projective(), num_transformers=2, crop_size=20, init_scale=0.8)
    training = LocalizationTraining(lr_scale=0.5, optimizer=None, coverage_weight=2.0)
    module = STNModule(image_size=32, backbone="test_resnet", transformer=spec, localization=training)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,)))
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path / "projective.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["transformer"]["num_transformers"] == 2  # plain data
    loaded = STNModule.load_from_checkpoint(path)  # no transform= needed
    assert type(loaded.transformer.transform).__name__ == "Projective"  # type: ignore[union-attr]
    assert loaded.transformer.num_transformers == 2 and loaded.transformer.output_size == (20, 20)  # type: ignore[union-attr]
    assert loaded.localization == training
    x = torch.randn(3, 1, 32, 32)
    module.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), module(x))


def test_a_spatial_transformer_from_yaml(tmp_path: Path) -> None:
    from stn_lightning.cli import main

    config = tmp_path / "mine.yaml"
    config.write_text(
        """
model:
  backbone: resnet10t
  fusion: features
  transformer:
    localizer: stn_lightning.PaperLocalizer
    transform: stn_lightning.transforms.Attention
    num_transformers: 2
    crop_size: 24
    mode: nearest
data:
  class_path: stn_lightning.data.DistortedMNIST
  init_args: {variant: RTS, batch_size: 4}
"""
    )
    args = ["fit", "--config", str(config), "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu"]
    cli = main(args + ["--trainer.enable_progress_bar", "false"])
    transformer = cli.model.transformer
    assert type(transformer.transform).__name__ == "Attention"
    assert transformer.num_transformers == 2 and transformer.mode == "nearest" and transformer.output_size == (24, 24)
    assert cli.trainer.state.finished


@pytest.mark.parametrize(("channels_last", "expected"), [(None, True), (True, True), (False, False)])
def test_training_on_cpus_keeps_the_convolution_weights_channels_last_unless_told_not_to(
    channels_last: bool | None, expected: bool
) -> None:
    torch.manual_seed(0)
    module = STNModule(backbone="stn_paper_cnn_st", image_size=28, channels_last=channels_last)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    # Weights of one input channel have the same strides in both formats; the others tell them apart.
    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert len(weights) == 2  # the second convolutions of the localiser and of the classifier
    assert all(w.is_contiguous(memory_format=torch.channels_last) == expected for w in weights)
    assert all(w.is_contiguous() != expected for w in weights)
    assert module.uses_channels_last(torch.device("cuda")) is bool(channels_last)  # not on accelerators unless told


def test_channels_last_weights_compute_the_same_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    # Without the localiser's batch standardisation, which amplifies float rounding at a random start (1e-3 here).
    kwargs: dict[str, Any] = {
        "transformer": TransformerSpec(transform=Projective(), feature_norm=False),
        "channels_last": False,
    }
    plain = STNModule(backbone="stn_paper_cnn_st", image_size=42, **kwargs)
    for p in plain.parameters():  # away from the identity start, so that the warps and crops differ per image
        p.data.add_(0.05 * torch.randn_like(p))
    last = STNModule(backbone="stn_paper_cnn_st", image_size=42, **kwargs)
    last.load_state_dict(plain.state_dict())
    last.to(memory_format=torch.channels_last)
    x, y = torch.randn(8, 1, 42, 42), torch.randint(0, 10, (8,))
    outputs = []
    for module in (plain, last):
        module.train()
        xi = x.clone().requires_grad_()
        logits = module(xi)
        torch.nn.functional.cross_entropy(logits, y).backward()
        outputs.append((logits, xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (la, ga, pa), (lb, gb, pb) = outputs

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        # Float rounding only (a different summation order: 1e-5 relative here); a layout mistake, such as features
        # flattened in the wrong order, is off by the values' own size.
        return bool((a - b).norm() <= 1e-4 * a.norm()) and a.norm() > 0

    assert close(la, lb)
    assert close(ga, gb)
    assert all(close(pa[name], pb[name]) for name in pa)
    assert len(pa) > 10


def _backbone_input(model: STNClassifier, x: torch.Tensor) -> torch.Tensor:
    """What the backbone of ``model`` is given for images ``x``."""
    seen: list[torch.Tensor] = []
    net: Any = model.backbone
    features = net.forward_features
    net.forward_features = lambda images: seen.append(images) or features(images)
    try:
        model(x)
    finally:
        del net.forward_features  # the class's method again
    return seen[0]


def test_object_channels_give_crop_k_channel_k_only() -> None:
    # MNIST addition's prior: digit k is in channel k. Transformer k's localiser sees both channels, but its crop
    # keeps channel k only, and the one-channel backbone classifies K crops under the sum head.
    torch.manual_seed(0)
    module = STNModule(
        num_classes=19, in_chans=2, image_size=24, backbone="test_resnet", fusion="features", task=SumOfObjects(),
        object_channels=True, transformer=TransformerSpec(num_transformers=2, init="tiled", transform=Attention()),
    )  # fmt: skip
    model = module.model
    x = torch.randn(3, 2, 24, 24)
    crops, _ = model.transformer(x)  # type: ignore[misc]
    expected = torch.stack([crops[:, 0, 0], crops[:, 1, 1]], dim=1).flatten(0, 1)[:, None]
    torch.testing.assert_close(_backbone_input(model, x), expected)
    logits, params = model(x)
    assert logits.shape == (3, 19) and params is not None and params.shape == (3, 2, 3)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(3))


def test_object_channels_baseline_classifies_each_channel() -> None:
    module = STNModule(
        num_classes=19,
        in_chans=2,
        image_size=24,
        backbone="test_resnet",
        fusion="none",
        object_channels=True,
        task=SumOfObjects(),
    )
    x = torch.randn(3, 2, 24, 24)
    torch.testing.assert_close(_backbone_input(module.model, x), x.reshape(6, 1, 24, 24))
    logits, params = module.model(x)
    assert logits.shape == (3, 19) and params is None
    assert module.task.head.out_features == 10  # one digit per channel


@pytest.mark.parametrize(
    ("fusion", "k", "task", "match"),
    [
        ("channels", 2, SumOfObjects(), "fusion 'features', not 'channels'"),
        ("features", 2, Classification(), "needs a task that reads one object per crop"),
        ("features", 3, SumOfObjects(), "one transformer per channel"),
    ],
)
def test_object_channels_reject_what_they_cannot_do(fusion: str, k: int, task: Task, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        STNModule(
            num_classes=19, in_chans=2, image_size=24, backbone="test_resnet",
            transformer=TransformerSpec(num_transformers=k),
            fusion=fusion, object_channels=True, task=task,  # type: ignore[arg-type]
        )  # fmt: skip
