"""The project's timm models meet timm's model contract, and networks with spatial transformers trace with torch.fx.

Two parts. The first tests each behaviour of the paper's networks as timm models (feature levels, intermediates,
pruning, the default config, the unflattened head, FX tracing, the FCNs' error) and FX feature extraction of timm
networks holding spatial transformers. The second runs what timm's own model tests (tests/test_models.py in timm's
repository) check, written here, against every model the project registers (``timm.list_models("stn_*")``):
forward, backward, default config, features_only, forward_intermediates, FX forward and FX backward. timm's
TorchScript tests are left out (TorchScript is deprecated in this PyTorch), and so, for the fully connected
networks, are the two that need spatial features (the spatial default-config test and features_only): they get
timm's test for models without a spatial map instead, and features_only raises.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import stn_lightning  # noqa: F401  (registers the models)
from stn_lightning.insertion import insert_transformers, inserted_transformers
from stn_lightning.localization import FeatureLocalizer, PaperLocalizer, TimmLocalizer
from stn_lightning.model import STNClassifier
from stn_lightning.transformer import SpatialTransformer
from stn_lightning.transforms import Affine

MODELS = timm.list_models("stn_*")
CNNS = ["stn_paper_cnn", "stn_paper_cnn_st", "stn_sequence_cnn"]
FCNS = ["stn_paper_fcn", "stn_paper_fcn_st"]
# Per CNN: the channels and reductions of its feature levels, and their sides on the default input.
LEVELS = {
    "stn_paper_cnn": ([32, 32, 32], [1, 2, 7], [20, 4, 4]),
    "stn_paper_cnn_st": ([23, 23, 23], [1, 2, 7], [20, 4, 4]),
    "stn_sequence_cnn": ([32, 48, 64, 96], [2, 4, 8, 16], [32, 16, 8, 4]),
}
FEATURE_CLASSES = ["getter", "list", "dict", "hook", "fx"]
# The tracer settings of timm's FX tests: timm's leaves (spatial transformers included) and functions.
TRACER = {
    "leaf_modules": timm.layers.get_notrace_modules(),
    "autowrap_functions": timm.layers.get_notrace_functions(),
    "param_shapes_constant": True,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _images(model: nn.Module, batch: int = 2, seed: int = 0) -> Tensor:
    # A batch of the size the default config names (all of them are below timm's test targets).
    size = model.pretrained_cfg["input_size"]
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def test_every_model_of_the_project_is_covered() -> None:
    assert sorted(MODELS) == sorted(CNNS + FCNS)


# -- The paper's networks as timm models --------------------------------------------------------------------------


@pytest.mark.parametrize("feature_cls", FEATURE_CLASSES)
@pytest.mark.parametrize("name", CNNS)
def test_features_only_gives_each_level(name: str, feature_cls: str) -> None:
    # Every timm feature extractor gives the same maps: forward_intermediates' (the default, "getter"), the module
    # list's, the hooks' and the FX graph's.
    channels, reductions, sides = LEVELS[name]
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
    torch.manual_seed(0)
    model = timm.create_model(name).eval()  # the same weights
    assert features.feature_info.channels() == channels
    assert features.feature_info.reduction() == reductions
    x = _images(model)
    maps = features(x)
    maps = list(maps.values()) if isinstance(maps, dict) else maps
    assert [tuple(m.shape) for m in maps] == [(2, c, s, s) for c, s in zip(channels, sides, strict=True)]
    expected = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected, strict=True))


@pytest.mark.parametrize("name", CNNS)
def test_features_only_out_indices_pick_levels(name: str) -> None:
    channels, _, _ = LEVELS[name]
    features = timm.create_model(name, features_only=True, out_indices=(-1,)).eval()
    assert features.feature_info.channels() == channels[-1:]
    assert len(features(_images(features))) == 1


@pytest.mark.parametrize("name", CNNS)
def test_forward_intermediates_against_forward_features(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _images(model)
    final, maps = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert [m.shape[1] for m in maps] == LEVELS[name][0]
    if name != "stn_sequence_cnn":  # the paper CNN's last level is the pooled grid, forward_features' map
        assert torch.equal(maps[-1], final)
    # The last n, named levels (negative from the end), and stopping early.
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(last_two, maps[-2:], strict=True))
    first = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    assert torch.equal(first[0], maps[0]) and torch.equal(first[1], maps[-1])
    early, only = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert torch.equal(only[0], maps[1]) and torch.equal(early, maps[1])
    with pytest.raises(ValueError, match="feature levels"):
        model.forward_intermediates(x, indices=[len(maps)])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="at least"):  # the input check of forward_features
        model.forward_intermediates(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("name", CNNS)
def test_prune_intermediate_layers(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _images(model)
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    # The network now ends at level 1, without head: forward gives that map.
    assert torch.equal(model(x), maps[1])
    assert model.num_classes == 0 and model.num_features == model.head_hidden_size == maps[1].shape[1]
    assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(x, [0, 1])[1], maps[:2], strict=True))


@pytest.mark.parametrize("name", MODELS)
def test_default_config_is_complete_and_names_the_state_dict(name: str) -> None:
    model = timm.create_model(name)
    cfg, state = model.pretrained_cfg, model.state_dict()
    for field in ("input_size", "min_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"):
        assert cfg[field] is not None, field
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert cfg["input_size"][0] == len(cfg["mean"]) == len(cfg["std"]) == model.in_chans
    if name in CNNS:
        assert tuple(model.forward_features(_images(model)).shape[-2:]) == cfg["pool_size"]
    else:
        assert cfg.get("pool_size") is None  # no spatial map
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == cfg["input_size"] and data["mean"] == cfg["mean"]
    # timm adapts the first layer when weights of another channel count load: by summing a convolution's channels,
    # by dropping a fully connected layer's weights (with a warning) and keeping the rest.
    wider = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, in_chans=2)
    assert torch.equal(wider.get_classifier().weight, model.get_classifier().weight)


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier_to_the_unflattened_map(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _images(model)
    features = model.forward_features(x)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)
    model.reset_classifier(0, "")
    assert torch.equal(model(x), features)  # the map for the CNNs, (B, C, h, w); the FCNs' features are flat
    assert torch.equal(model.forward_head(features, pre_logits=True).flatten(1), features.flatten(1))
    unflattened = timm.create_model(name, num_classes=0, global_pool="").eval()
    assert unflattened(x).shape == features.shape
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(3)  # global_pool "" stays: no classifier can read the map
    model.reset_classifier(3, "flatten")
    assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="global pool"):
        model.reset_classifier(3, "avg")


@pytest.mark.parametrize("name", FCNS)
def test_fully_connected_networks_have_no_spatial_features(name: str) -> None:
    with pytest.raises(ValueError, match="fully connected network: it has no spatial feature maps"):
        timm.create_model(name, features_only=True)
    model = timm.create_model(name)
    assert not hasattr(model, "feature_info") and model.head_hidden_size == model.num_features > 0


@pytest.mark.parametrize("name", MODELS)
def test_stn_classifier_reads_head_hidden_size(name: str) -> None:
    # Without input_size the classifier's head takes the backbone's pre-logits width, head_hidden_size.
    model = STNClassifier(name, num_classes=4, in_chans=1, fusion="none").eval()
    x = _images(timm.create_model(name))
    logits, params = model(x)
    assert logits.shape == (2, 4) and params is None


@pytest.mark.parametrize("name", MODELS)
def test_fx_symbolic_trace_equals_eager(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, drop_rate=0.2)
    x = _images(model)
    for training in (True, False):
        model.train(training)
        traced = torch.fx.symbolic_trace(model)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        assert torch.equal(traced(x), expected)  # dropout and batch statistics included
    # The input checks stay in eager mode.
    with pytest.raises(ValueError, match="expected images"):
        model(torch.zeros(2, 3, 64, 64))


def test_check_input_size_traces_and_still_checks() -> None:
    localizer = PaperLocalizer(1).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(torch.fx.symbolic_trace(localizer)(x), localizer(x))
    with pytest.raises(ValueError, match="at least 16"):
        localizer(torch.zeros(1, 1, 15, 15))
    timm_localizer = TimmLocalizer(1, "stn_paper_cnn", hidden=8).eval()  # num_features is the map's channels
    x = torch.randn(2, 1, 32, 32)
    assert timm_localizer(x).shape == (2, 8)
    assert torch.equal(torch.fx.symbolic_trace(timm_localizer)(x), timm_localizer(x))


# -- Spatial transformers inside timm networks, through timm's and torchvision's FX feature extraction --------------


class _Warp(nn.Module):
    # A spatial transformer put in front of a stage by hand: it passes on the warped map.
    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.st = SpatialTransformer(FeatureLocalizer(channels), Affine(), output_size=size, feature_norm=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.st(x).crops[:, 0]


def _resnet_with_a_transformer_by_hand() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    model.layer3 = nn.Sequential(_Warp(128, 4), model.layer3)  # layer3 reads layer2's 128 x 4 x 4 map at 32 px
    with torch.no_grad():  # off the identity, so that the warp matters
        model.layer3[0].st.head.bias.add_(0.1 * torch.randn(6))
    return model


def test_timm_fx_feature_extraction_of_a_resnet_with_a_transformer_by_hand() -> None:
    model = _resnet_with_a_transformer_by_hand().eval()
    x = torch.randn(2, 3, 32, 32)
    features = timm.models.FeatureGraphNet(model, out_indices=(1, 2, 3, 4)).eval()
    expected = model.forward_intermediates(x, indices=(1, 2, 3, 4), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(features(x), expected, strict=True))
    # The whole network traced with timm's leaves, as timm's FX tests do: the same logits.
    traced = timm.layers.create_feature_extractor(model, ["fc"])
    assert torch.equal(traced(x)["fc"], model(x))
    # In training mode the transformer keeps its own input check: feature_norm needs a batch of 2 or more.
    model.train()
    with pytest.raises(ValueError, match="batch of one"):
        timm.layers.create_feature_extractor(model, ["fc"])(x[:1])


def test_torchvision_feature_extraction_with_timms_leaves() -> None:
    model = _resnet_with_a_transformer_by_hand().eval()
    x = torch.randn(2, 3, 32, 32)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER)
    assert "layer3.0.st" in eval_nodes and "layer3.0.st" in train_nodes  # one node: a leaf
    extractor = create_feature_extractor(model, ["layer3.0.st", "layer4", "fc"], tracer_kwargs=TRACER)
    out = extractor(x)
    assert torch.equal(out["fc"], model(x))
    assert torch.equal(out["layer3.0.st"].crops, model.layer3[0].st(model.forward_intermediates(x, [2])[1][0]).crops)


def test_fx_feature_extraction_of_inserted_transformers() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    insert_transformers(model, ["layer2", "layer3"], Affine(), input_size=32, in_chans=3)
    features = timm.models.FeatureGraphNet(model, out_indices=(1, 2, 3)).eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    maps = features(x)
    expected = model.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected, strict=True))
    # The traced network runs the inserted transformers themselves: their parameters are set, and in training mode
    # the loss reaches their localisers.
    wrappers = inserted_transformers(model)
    for wrapper in wrappers.values():
        wrapper.params = None
    features.train()
    sum(m.sum() for m in features(x)).backward()
    for wrapper in wrappers.values():
        assert wrapper.params is not None and wrapper.params.shape == (2, 1, 6)
        assert wrapper.transformer.localizer.features[2].weight.grad is not None


def test_fx_feature_extraction_of_the_paper_cnn_with_inserted_transformers() -> None:
    torch.manual_seed(0)
    model = timm.create_model("stn_paper_cnn")
    insert_transformers(model, ["conv2"], Affine(), input_size=28, in_chans=1)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    graph = timm.models.FeatureGraphNet(model, out_indices=(0, 1, 2)).eval()
    expected = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(graph(x), expected, strict=True))


# -- timm's model tests, against every model the project registers -----------------------------------------------


def _assert_levels(model: nn.Module, maps: list[Tensor], channels: list[int], reductions: list[int], x: Tensor):
    # timm's check of feature maps: channels, and no side larger than the input over the reduction (+1).
    assert len(maps) == len(channels) >= 3
    for c, r, m in zip(channels, reductions, maps, strict=True):
        assert m.shape[:2] == (x.shape[0], c) and not m.isnan().any()
        assert m.shape[-2] <= math.ceil(x.shape[-2] / r) + 1 and m.shape[-1] <= math.ceil(x.shape[-1] / r) + 1


@pytest.mark.parametrize("name", MODELS)
def test_timm_forward(name: str) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    out = model(_images(model, batch=1))
    assert out.shape == (1, 10) and not out.isnan().any()


@pytest.mark.parametrize("name", MODELS)
def test_timm_backward(name: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=42).train()
    out = model(_images(model))
    out.mean().backward()
    assert out.shape[-1] == 42 and not out.isnan().any()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", CNNS)
def test_timm_default_cfgs(name: str) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, state = model.pretrained_cfg, model.state_dict()
    x = _images(model, batch=1)
    features = model.forward_features(x)
    pre = model.forward_head(features, pre_logits=True)
    assert features.shape[-2:] == cfg["pool_size"] and features.shape[1] == model.num_features
    assert pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    model.reset_classifier(0, "")
    out = model(x)
    assert out.dim() == 4 and out.shape[-2:] == cfg["pool_size"]
    out = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()(x)
    assert out.dim() == 4 and out.shape[-2:] == cfg["pool_size"]
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", FCNS)
def test_timm_default_cfgs_without_spatial_map(name: str) -> None:
    # timm's test for models whose features have no spatial layout (its "non-standard" models).
    model = timm.create_model(name, pretrained=False).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, state = model.pretrained_cfg, model.state_dict()
    x = _images(model, batch=1)
    features = model.forward_features(x)
    pre = model.forward_head(features, pre_logits=True)
    assert features.shape[1] == model.num_features and pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape == (1, model.head_hidden_size)
    assert timm.create_model(name, pretrained=False, num_classes=0).eval()(x).shape[1] == model.num_features
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("feature_cls", [None, "getter"])
@pytest.mark.parametrize("name", CNNS)
def test_timm_forward_features(name: str, feature_cls: str | None) -> None:
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    model = timm.create_model(name, pretrained=False, features_only=True, **kwargs).eval()
    x = _images(model, batch=1)
    _assert_levels(model, model(x), model.feature_info.channels(), model.feature_info.reduction(), x)


@pytest.mark.parametrize("name", CNNS)
def test_timm_forward_intermediates(name: str) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = _images(model, batch=1)
    final, maps = model.forward_intermediates(x, output_fmt="NCHW")
    _assert_levels(model, maps, info.channels(), info.reduction(), x)
    assert torch.allclose(final, model.forward_features(x))


def _fx_model(model: nn.Module, train: bool) -> nn.Module:
    # timm's FX tests: the whole network traced with timm's leaves, returning its last node (in both modes).
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=TRACER,
    ).train(train)


@pytest.mark.parametrize("name", MODELS)
def test_timm_forward_fx(name: str) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    x = _images(model, batch=1)
    with torch.inference_mode():
        expected = model(x)
        out = torch.cat(tuple(_fx_model(model, train=False)(x).values()))
    assert torch.equal(out, expected) and not out.isnan().any()


@pytest.mark.parametrize("name", MODELS)
def test_timm_backward_fx(name: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=42).train()
    traced = _fx_model(model, train=True)
    out = torch.cat(tuple(traced(_images(model)).values()))
    out.mean().backward()
    assert out.shape[-1] == 42 and not out.isnan().any()
    assert all(p.grad is not None for p in traced.parameters())
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())
