"""The localisation recipe's options: the boundary penalty, the localiser's own optimiser, the initial zoom of the
transformers; and the study's knobs (warm-up of the localisation rate, identity pull, decay), which live in
benchmarks/recipe_study.py."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from stn_lightning.localization import PaperLocalizer
from stn_lightning.module import STNModule
from stn_lightning.recipe import GroupedOptimizer, LocalizationTraining, boundary_penalty
from stn_lightning.transformer import SpatialTransformer, TransformerSpec
from stn_lightning.transforms import Affine, Attention


def _study() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_study.py"
    spec = importlib.util.spec_from_file_location("recipe_study", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipe_study"] = module
    spec.loader.exec_module(module)
    return module


study = _study()
warmup_factor, decay_factor, identity_penalty = study.warmup_factor, study.decay_factor, study.identity_penalty


def test_warmup_factor_at_start_middle_and_end() -> None:
    assert warmup_factor(0, 100) == pytest.approx(0.01)
    assert warmup_factor(49, 100) == pytest.approx(0.5)
    assert warmup_factor(99, 100) == 1.0
    assert warmup_factor(500, 100) == 1.0
    assert warmup_factor(0, 0) == 1.0  # no warm-up


def test_default_scheduler_warms_up_only_the_localisation_group() -> None:
    module = study.StudyModule(
        backbone="test_resnet", localization=LocalizationTraining(lr_scale=0.1), loc_warmup_steps=10
    )
    optimizer = torch.optim.SGD(module.parameter_groups(), lr=0.1)
    optimizer.param_groups[1]["lr"] = 0.01  # what configure_optimizers does with localization.lr_scale
    steps = 100
    scheduler = module.default_scheduler(optimizer, steps)
    rates = []
    for _ in range(steps):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()

    def cosine(t: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * t / steps))

    assert rates[0] == pytest.approx([0.1, 0.01 * 0.1])  # step 0: the classifier at full rate, the localiser at 1/10
    assert rates[4] == pytest.approx([0.1 * cosine(4), 0.01 * cosine(4) * 0.5])  # half-way through the warm-up
    assert rates[9] == pytest.approx([0.1 * cosine(9), 0.01 * cosine(9)])  # warm-up done: plain cosine
    assert rates[60] == pytest.approx([0.1 * cosine(60), 0.01 * cosine(60)])


@pytest.mark.parametrize("transform", [Affine(), Attention()])
def test_boundary_penalty_is_zero_inside_the_image(transform: Affine | Attention) -> None:
    inside = torch.stack([transform.identity(), transform.window(0.5, 0.5, -0.5), transform.window(0.3, 0.0, 0.6)])
    assert boundary_penalty(transform, inside.unsqueeze(0), (60, 60)).item() == 0.0


def test_boundary_penalty_gradient_points_back_inside() -> None:
    att = Attention()
    # Shifted right past the edge, and zoomed out beyond the whole image.
    params = torch.tensor([[[0.5, 1.2, 0.0], [1.5, 0.0, 0.0]]], requires_grad=True)
    penalty = boundary_penalty(att, params, (60, 60))
    assert penalty.item() > 0
    (grad,) = torch.autograd.grad(penalty, params)
    assert grad[0, 0, 1] > 0 and grad[0, 0, 0] > 0  # a descent step moves the window left and shrinks it
    assert grad[0, 1, 0] > 0 and grad[0, 1, 1:].abs().max() < 1e-6  # zoom in, no shift for a centred window
    # One small step of descent lowers the penalty.
    stepped = (params - 0.01 * grad).detach()
    assert boundary_penalty(att, stepped, (60, 60)) < penalty


def test_identity_penalty_and_decay() -> None:
    start = Affine().identity()
    assert identity_penalty(start.expand(3, 2, -1), start).item() == 0.0
    moved = start.clone()
    moved[2] = 0.5
    assert identity_penalty(moved.expand(3, 2, -1), start).item() == pytest.approx(0.25)
    assert decay_factor(0, 100) == 1.0
    assert decay_factor(50, 100) == pytest.approx(0.5)
    assert decay_factor(100, 100) == 0.0 and decay_factor(1000, 100) == 0.0
    assert decay_factor(10**6, None) == 1.0


def test_module_penalty_weights_and_decay() -> None:
    boundary = LocalizationTraining(boundary_weight=2.0)
    module = study.StudyModule(backbone="test_resnet", image_size=32, localization=boundary, penalty_decay_steps=10)
    params = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]]).expand(4, 1, -1)  # the whole image, shifted half out
    expected = 2.0 * boundary_penalty(Affine(), params, (32, 32))
    assert expected.item() > 0
    torch.testing.assert_close(module.localization_penalty(params, (32, 32)), expected)  # step 0: full weight
    plain = STNModule(backbone="test_resnet", image_size=32, localization=boundary)
    torch.testing.assert_close(plain.localization_penalty(params, (32, 32)), expected)  # no decay outside the study
    default = STNModule(backbone="test_resnet", image_size=32)
    assert default.localization_penalty(params, (32, 32)).item() == 0.0  # off by default
    with pytest.raises(ValueError, match="boundary_weight"):
        LocalizationTraining(boundary_weight=-1.0)


@pytest.mark.parametrize("transform", [Affine(), Attention(scale_range=(0.2, 1.0), translation_range=1.0)])
def test_init_scale_starts_at_a_centred_zoom(transform: Affine | Attention) -> None:
    st = SpatialTransformer(PaperLocalizer(1), transform, 2, 10, init_scale=0.5)
    x = torch.randn(3, 1, 20, 20)
    out = st(x)
    torch.testing.assert_close(out.params, transform.window(0.5, 0.0, 0.0).expand(3, 2, -1), atol=1e-5, rtol=0)
    # A window of half the image, sampled at half the input's size, reads the central pixels exactly.
    torch.testing.assert_close(out.crops[:, 0], x[:, :, 5:15, 5:15], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="init_scale"):
        SpatialTransformer(PaperLocalizer(1), transform, 1, 10, init_scale=0.0)


def test_loc_optimizer_steps_the_localisation_group_with_its_own_optimiser() -> None:
    torch.manual_seed(0)
    module = study.StudyModule(
        backbone="test_resnet",
        image_size=32,
        loc_warmup_steps=4,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1),
        localization=LocalizationTraining(lr_scale=0.5, optimizer=lambda groups: torch.optim.Adam(groups, lr=1e-3)),
    )
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 32, 32), torch.randint(0, 10, (16,)))
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, GroupedOptimizer)
    sgd, adam = optimizer.optimizers
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adam, torch.optim.Adam)
    assert [g["name"] for g in optimizer.param_groups] == ["model", "localization"]
    # The scheduler reaches Adam's group: 1e-3 * lr_scale, warmed up 2 of 4 steps, after 2 steps of cosine.
    cosine = 0.5 * (1 + math.cos(math.pi * 2 / trainer.estimated_stepping_batches))
    assert adam.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * cosine * 3 / 4)
    loc = list(module.transformer.parameters())  # type: ignore[union-attr]
    assert all(int(optimizer.state[p]["step"]) == 2 for p in loc)  # Adam's state, in the one shared state
    assert len(optimizer.state) == len(loc)  # plain SGD keeps no state
    # torch's own state dict round-trips into a fresh one, whose parts then step from the restored state.
    fresh = module.configure_optimizers()["optimizer"]
    fresh.load_state_dict(optimizer.state_dict())
    assert [g["optimizer"] for g in fresh.param_groups] == ["SGD", "Adam"]
    assert fresh.optimizers[1].param_groups[0]["lr"] == adam.param_groups[0]["lr"]
    assert fresh.optimizers[1].state is fresh.state and int(fresh.state[loc[0]]["step"]) == 2
    fresh.step()  # the gradients of the last step are still there
    assert int(fresh.state[loc[0]]["step"]) == 3


def test_module_init_scale_defaults_to_the_crop_input_ratio() -> None:
    def start(module: STNModule) -> float:
        return module.transformer.transform(module.transformer.head.bias.view(1, -1))[0, 0].item()  # type: ignore[union-attr]

    def module(image_size: Any, **spec: Any) -> STNModule:
        return STNModule(backbone="test_resnet", image_size=image_size, transformer=TransformerSpec(**spec))

    assert start(module(60, crop_size=30)) == pytest.approx(0.5)
    assert start(module((60, 40), crop_size=(30, 30))) == pytest.approx(0.75)
    assert start(module(42)) == pytest.approx(1.0)  # crop = input: identity
    assert start(module(28, crop_size=40)) == pytest.approx(1.0)  # capped
    assert start(module(60, crop_size=30, init_scale=1.0)) == pytest.approx(1.0)
