"""The paper's CNN and FCN as timm models: registration, parameter counts, timm's interface, STNModule."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import stn_lightning  # noqa: F401  (registers the models)
from stn_lightning.backbones import PaperCNN, PaperFCN
from stn_lightning.localization import create_timm_model
from stn_lightning.module import STNModule
from stn_lightning.transformer import TransformerSpec
from stn_lightning.transforms import Attention

NAMES = ["stn_paper_cnn", "stn_paper_cnn_st", "stn_paper_fcn", "stn_paper_fcn_st"]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cnn_params(in_chans: int, c1: int, c2: int, classes: int, pool: int = 4) -> int:
    # conv 9x9 (weights + biases), conv 7x7, fully connected on the c2 x pool x pool map.
    return c1 * (in_chans * 81 + 1) + c2 * (c1 * 49 + 1) + classes * (c2 * pool * pool + 1)


def _fcn_params(in_chans: int, hidden: list[int], classes: int, grid: int = 28) -> int:
    widths = [in_chans * grid * grid, *hidden[:-1]]
    return sum(h * (w + 1) for w, h in zip(widths, hidden, strict=True)) + classes * (hidden[-1] + 1)


EXPECTED = {
    "stn_paper_cnn": lambda c, n: _cnn_params(c, 32, 32, n),
    "stn_paper_cnn_st": lambda c, n: _cnn_params(c, 23, 23, n),
    "stn_paper_fcn": lambda c, n: _fcn_params(c, [128, 128], n),
    "stn_paper_fcn_st": lambda c, n: _fcn_params(c, [102, 102], n),
}


def test_hand_counts_match_the_documented_numbers() -> None:
    # The numbers in the backbones docstring, from the formulas above (1 channel, 10 classes).
    assert [EXPECTED[n](1, 10) for n in NAMES] == [57_962, 31_520, 118_282, 91_606]
    # PaperLocalizer(1): conv 5x5 20, conv 5x5 20, fc 320 -> 50; affine head 50 -> 6.
    localiser = 20 * 26 + 20 * (20 * 25 + 1) + 50 * (320 + 1) + 6 * 51
    assert localiser == 26_896


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_created_through_timm(name: str) -> None:
    assert timm.is_model(name) and name in timm.list_models("stn_paper_*")
    model = timm.create_model(name, num_classes=7, in_chans=2)
    assert model.num_classes == 7 and model.pretrained_cfg["architecture"] == name
    assert model.default_cfg is model.pretrained_cfg
    assert _count(model) == EXPECTED[name](2, 7)
    for size in (28, 42):  # the parameter count does not depend on the input size
        x = torch.randn(3, 2, size, size)
        assert model(x).shape == (3, 7)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, model.head_hidden_size)
    # The defaults come from the pretrained cfg: 10 classes, 1 channel.
    default = timm.create_model(name)
    assert default.num_classes == 10 and default.in_chans == 1
    assert _count(default) == EXPECTED[name](1, 10)


@pytest.mark.parametrize("name", NAMES)
def test_classifier_interface(name: str) -> None:
    model = timm.create_model(name, num_classes=0)
    x = torch.randn(2, 1, 30, 30)
    feats = model(x)
    assert feats.shape == (2, model.head_hidden_size)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (2, 5)
    assert model.get_classifier().weight.shape == (5, model.head_hidden_size)
    with pytest.raises(ValueError, match="global pool"):
        model.reset_classifier(5, global_pool="avg")


def test_position_sensitive_and_size_checks() -> None:
    torch.manual_seed(0)
    model = PaperCNN(num_classes=0).eval()
    # The same blob in two corners gives different features: no global pooling.
    a, b = torch.zeros(1, 1, 60, 60), torch.zeros(1, 1, 60, 60)
    a[..., 5:15, 5:15] = 1.0
    b[..., 45:55, 45:55] = 1.0
    assert not torch.allclose(model(a), model(b))
    assert model.min_size == 22
    with pytest.raises(ValueError, match="at least 22"):
        model(torch.zeros(1, 1, 21, 21))
    with pytest.raises(ValueError, match="channels|expected images"):
        PaperFCN(in_chans=1)(torch.zeros(1, 3, 28, 28))


@pytest.mark.parametrize("name", ["stn_paper_cnn", "stn_paper_fcn"])
def test_baseline_and_st_sides_have_about_the_same_size(name: str) -> None:
    baseline = STNModule(backbone=name, fusion="none", image_size=42)
    st = STNModule(backbone=f"{name}_st", image_size=42)
    assert _count(baseline) == EXPECTED[name](1, 10)
    assert abs(_count(st) / _count(baseline) - 1) < 0.01


@pytest.mark.parametrize("name", ["stn_paper_cnn", "stn_paper_fcn_st"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"fusion": "none", "in_chans": 1, "image_size": 28},
        {
            "fusion": "channels",
            "in_chans": 2,
            "image_size": 42,
            "transformer": TransformerSpec(num_transformers=2),
            "num_classes": 19,
        },
        {
            "fusion": "features",
            "in_chans": 1,
            "image_size": 64,
            "transformer": TransformerSpec(transform=Attention(), num_transformers=2, crop_size=30, init="tiled"),
        },
    ],
    ids=["none", "channels", "features"],
)
def test_stn_module_forward_backward(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    module = STNModule(backbone=name, **kwargs)
    size = kwargs["image_size"]
    x = torch.randn(4, kwargs["in_chans"], size, size)
    y = torch.randint(0, module.hparams.num_classes, (4,))
    loss = torch.nn.functional.cross_entropy(module(x), y)
    loss.backward()
    grads = [p.grad for p in module.model.backbone.parameters()]
    assert all(g is not None and g.isfinite().all() for g in grads)
    if module.transformer is not None:
        assert module.transformer.head.bias.grad is not None


def test_local_pretrained_weights_load_through_create_timm_model(tmp_path: Path) -> None:
    source = timm.create_model("stn_paper_cnn")
    path = tmp_path / "cnn.pth"
    torch.save(source.state_dict(), path)
    # A headless copy for STNClassifier: the classifier is dropped, the convolutions are loaded.
    loaded = create_timm_model("stn_paper_cnn", pretrained=str(path), num_classes=0)
    assert loaded.num_classes == 0 and torch.equal(loaded.conv2.weight, source.conv2.weight)
    # timm adapts the first convolution (the cfg's first_conv) to more channels, keeping its sum over channels.
    wider = create_timm_model("stn_paper_cnn", pretrained=str(path), num_classes=0, in_chans=2)
    torch.testing.assert_close(wider.conv1.weight.sum(1, keepdim=True), source.conv1.weight)


@pytest.mark.parametrize("in_chans, kernel", [(1, 9), (2, 5)])
def test_first_convolution_gradients_equal_pytorchs(in_chans: int, kernel: int) -> None:
    # The paper CNN's first convolution computes its image gradient by fold on CPUs (a speed-up behind a
    # transformer); every gradient must equal nn.Conv2d's.
    from stn_lightning.backbones import _Conv2dFoldGrad

    torch.manual_seed(0)
    mine = _Conv2dFoldGrad(in_chans, 5, kernel).double()
    plain = torch.nn.Conv2d(in_chans, 5, kernel).double()
    plain.load_state_dict(mine.state_dict())
    x = torch.randn(3, in_chans, 13, 16, dtype=torch.float64, requires_grad=True)
    out = mine(x)
    assert out.grad_fn is not None and "ConvFoldGrad" in type(out.grad_fn).__name__  # the fold path ran
    weights = torch.randn_like(out)
    ours = torch.autograd.grad((out * weights).sum(), (x, mine.weight, mine.bias))
    theirs = torch.autograd.grad((plain(x) * weights).sum(), (x, plain.weight, plain.bias))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    mine.eval()  # evaluation (and export) uses nn.Conv2d's own forward
    assert "ConvFoldGrad" not in type(mine(x).grad_fn).__name__


def test_first_convolution_keeps_pytorchs_gradient_on_many_channels() -> None:
    # Fold's product grows with the channels; above FOLD_MAX_CHANNELS PyTorch's backward is the faster one.
    from stn_lightning.backbones import _Conv2dFoldGrad

    wide = _Conv2dFoldGrad(_Conv2dFoldGrad.FOLD_MAX_CHANNELS + 1, 5, 3)
    out = wide(torch.randn(2, wide.in_channels, 8, 8, requires_grad=True))
    assert out.grad_fn is not None and "ConvFoldGrad" not in type(out.grad_fn).__name__


@pytest.mark.parametrize("size", [(11, 11), (12, 16), (5, 7), (4, 9)])
def test_pooling_written_out_for_export_equals_pytorchs(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    # Under export the CNN's adaptive max-pooling is written out as windowed maxima (ONNX cannot translate
    # PyTorch's); the windows must be PyTorch's, overlapping ones (11 -> 4) and exact divisions (12 -> 4) alike.
    from stn_lightning.backbones import _ExportableAdaptiveMaxPool2d

    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    pool = _ExportableAdaptiveMaxPool2d(4)
    expected = torch.nn.functional.adaptive_max_pool2d(x, 4)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(pool(x), expected)
