"""Spatial transformers inserted before named submodules of timm networks and the paper's CNN."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import stn_lightning  # noqa: F401  (registers the paper's networks with timm)
from stn_lightning.insertion import InsertedTransformer, inner_regions, insert_transformers, inserted_transformers
from stn_lightning.localization import FeatureLocalizer, create_timm_model
from stn_lightning.transforms import Attention

# (timm model, places, input channels, input size): a place per stage family (timm's small test models of each family:
# the insertion depends on the stages' structure, not their width), and the paper's two convolutions. On maps of a
# power-of-two side the identity warp is exact in float32; the paper's CNN's 12 x 12 map is not.
FAMILIES = [
    ("test_resnet", ["layer2", "layer3"], 3, 32),
    ("test_convnext", ["stages.1", "stages.2"], 3, 32),
    ("test_efficientnet", ["blocks.1", "blocks.3"], 3, 32),
    ("stn_paper_cnn", ["conv1", "conv2"], 1, 32),
]


def _model(name: str, in_chans: int) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=10, in_chans=in_chans)


def _perturb(model: nn.Module, scale: float) -> None:
    # Move every inserted transformer off the identity: its head's weights and bias, with the same random draw.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for wrapper in inserted_transformers(model).values():
            head = wrapper.transformer.head
            head.weight.add_(scale * torch.randn(head.weight.shape, generator=generator))
            head.bias.add_(scale * torch.randn(head.bias.shape, generator=generator))


@pytest.mark.parametrize(("name", "at", "in_chans", "size"), FAMILIES)
def test_identity_insertion_keeps_the_output(name: str, at: list[str], in_chans: int, size: int) -> None:
    torch.manual_seed(0)
    model = _model(name, in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        expected = model(x)
    assert insert_transformers(model, at, input_size=size, in_chans=in_chans) is model
    assert not model.training  # the probing forward restored the mode
    assert list(inserted_transformers(model)) == at
    with torch.no_grad():
        out = model(x)
    # Untrained EfficientNets' logits can be about 1e-5: the relative bound is what tests them.
    error, scale = (out - expected).abs().max().item(), expected.abs().max().item()
    assert error <= 1e-5 and error <= 1e-4 * scale, f"{name}: max |diff| {error:.2e}, max |logit| {scale:.2e}"
    for place in at:
        wrapper = model.get_submodule(place)
        assert isinstance(wrapper, InsertedTransformer) and wrapper.params is not None
        assert wrapper.params.shape == (2, 1, 6)
    # A warp away from the identity changes the output: the comparison above is not trivially true.
    _perturb(model, 0.05)
    with torch.no_grad():
        moved = (model(x) - expected).abs().max().item()
    assert moved > 100 * max(error, 1e-7 * scale) and moved > 1e-3 * scale, f"{name}: moved by {moved:.2e}"


def test_each_place_gets_the_map_it_sees_and_its_own_transform() -> None:
    model = _model("test_resnet", 3)
    transform = Attention()
    insert_transformers(model, ["layer2", "layer3"], transform, input_size=(32, 48), in_chans=3)
    assert model.training  # the mode it had before insertion
    wrappers = inserted_transformers(model)
    l2, l3 = wrappers["layer2"].transformer, wrappers["layer3"].transformer
    assert (l2.output_size, l3.output_size) == ((8, 12), (4, 6))  # the inputs of layer2 and layer3 of 32 x 48 images
    assert isinstance(l2.localizer, FeatureLocalizer) and l2.localizer.in_chans == 32 and l3.localizer.in_chans == 48
    assert isinstance(l2.transform, Attention) and l2.transform is not l3.transform and l2.transform is not transform


def test_transformers_take_the_model_dtype() -> None:
    torch.manual_seed(0)
    model = _model("stn_paper_cnn", 1).double().eval()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        insert_transformers(model, ["conv2"], input_size=32, in_chans=1)
        out = model(x)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    # float64 maps are sampled at float64 coordinates, and the identity's parameters (1 and 0) are exact in float32
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_gradients_reach_every_localiser_and_head() -> None:
    torch.manual_seed(0)
    model = _model("test_resnet", 3)
    insert_transformers(model, ["layer1", "layer2", "layer3"], input_size=32, in_chans=3)
    # The heads start at zero weights, which would stop the gradient to the localisers: move them off zero.
    _perturb(model, 0.01)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    # params keep their graph: a penalty on the warps reaches the localisers too
    params = [w.params for w in inserted_transformers(model).values()]
    assert all(p is not None and p.requires_grad for p in params)
    loss.backward()
    for place, wrapper in inserted_transformers(model).items():
        for pname, p in wrapper.transformer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{place}: no gradient for {pname}"
    # deepcopy (EMA, checkpoint callbacks) works after a training forward and drops the stored parameters
    copied = copy.deepcopy(model)
    assert all(w.params is None for w in inserted_transformers(copied).values())


def test_channels_last_maps_stay_channels_last() -> None:
    # A CPU trainer keeps the network channels-last: the warped map leaves in the layout it came in, and the backward
    # meets the same numbers as in the contiguous layout.
    torch.manual_seed(0)
    model = _model("test_resnet", 3)
    insert_transformers(model, ["layer2"], input_size=32, in_chans=3)
    _perturb(model, 0.05)
    seen: list[torch.Tensor] = []
    model.layer2.module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=layout)
        model.zero_grad()
        model(x.to(memory_format=layout)).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert not seen[0].is_contiguous(memory_format=torch.channels_last)
    assert seen[1].is_contiguous(memory_format=torch.channels_last) and not seen[1].is_contiguous()
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_pretrained_weights_from_a_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "test_resnet.pth"
    torch.save(_model("test_resnet", 3).state_dict(), path)
    # timm keeps a file's classifier only when its num_classes is the model's default (1000): both models get a
    # fresh one, the same from the same seed.
    torch.manual_seed(1)
    plain = create_timm_model("test_resnet", pretrained=str(path), num_classes=10).eval()
    torch.manual_seed(1)
    model = create_timm_model("test_resnet", pretrained=str(path), num_classes=10).eval()
    insert_transformers(model, ["layer2", "layer4"], input_size=64, in_chans=3)
    inner = model.get_submodule("layer2").module
    assert torch.equal(inner[0].conv1.weight, plain.layer2[0].conv1.weight)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _model("test_resnet", 3)  # shared: a failed insertion leaves it as it was, which each test checks


@pytest.mark.parametrize(
    ("at", "message"),
    [
        (["layer2", "layr3"], "no submodule named 'layr3' in ResNet; close names: layer3"),
        (["layer2", "layer2"], "submodule 'layer2' is named twice"),
        (["layer2.0.conv1", "layer2"], "submodule 'layer2.0.conv1' is inside 'layer2'"),
        (["fc"], "submodule 'fc' gets an input of shape (2, 96), not a feature map"),
        ([], "expected at least one submodule name"),
        ("layer2", "expected a list of submodule names, got the string 'layer2'"),
    ],
)
def test_bad_places_are_named(resnet: nn.Module, at: list[str], message: str) -> None:
    model = resnet
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        insert_transformers(model, at, input_size=32, in_chans=3)
    assert {name: type(m) for name, m in model.named_modules()} == before  # nothing was replaced


def test_feature_localizer_takes_maps_of_any_size() -> None:
    loc = FeatureLocalizer(16)
    assert (loc.in_chans, loc.out_features, loc.min_size) == (16, 32, 1)
    for size in (1, 3, 17):
        assert loc(torch.randn(2, 16, size, size)).shape == (2, 32)
    with pytest.raises(ValueError, match="expected 16 input channels"):
        loc(torch.randn(2, 8, 4, 4))


def test_inner_regions_at_identity_are_the_whole_image() -> None:
    model = _model("stn_paper_cnn", 1).eval()
    insert_transformers(model, ["conv1", "conv2"], input_size=(32, 40), in_chans=1)
    assert inner_regions(model, (32, 40)) == {}  # nothing has run yet
    with torch.no_grad():
        model(torch.randn(3, 1, 32, 40))
    for compose in (True, False):
        regions = inner_regions(model, (32, 40), per_side=2, compose=compose)
        assert list(regions) == ["conv1", "conv2"]
        # align_corners=False: the outline runs along the image's edges, half a pixel outside the corner centres,
        # clockwise from the top-left corner and closed
        corners = torch.tensor([[-0.5, -0.5], [39.5, -0.5], [39.5, 31.5], [-0.5, 31.5], [-0.5, -0.5]])
        for region in regions.values():
            assert region.shape == (3, 1, 9, 2)
            torch.testing.assert_close(region[:, 0, ::2], corners.expand(3, -1, -1), atol=1e-4, rtol=0)


def test_inner_regions_compose_through_earlier_transformers() -> None:
    # conv1's transformer reads the centred half of the image; conv2's reads the centred half of what conv1 passes
    # on, so a quarter of the image (composed) or half of its own map (not composed).
    model = _model("stn_paper_cnn", 1).eval()
    insert_transformers(model, ["conv1", "conv2"], Attention(), input_size=32, in_chans=1)
    with torch.no_grad():
        for wrapper in inserted_transformers(model).values():
            wrapper.transformer.head.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
        model(torch.randn(2, 1, 32, 32))
    composed, alone = inner_regions(model, 32, per_side=1), inner_regions(model, 32, per_side=1, compose=False)
    top_left = {name: (r[0, 0, 0, 0].item(), alone[name][0, 0, 0, 0].item()) for name, r in composed.items()}
    assert top_left["conv1"] == pytest.approx((7.5, 7.5))  # 15.5 - 16 / 2
    assert top_left["conv2"] == pytest.approx((11.5, 7.5))  # 15.5 - 16 / 4


def test_compiled_model_matches_eager() -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    torch.manual_seed(0)
    model = _model("stn_paper_cnn", 1).eval()
    insert_transformers(model, ["conv1", "conv2"], input_size=32, in_chans=1)
    _perturb(model, 0.05)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for wrapper in inserted_transformers(model).values():
            wrapper.params = None
        out = torch.compile(model, backend="eager", fullgraph=False)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert all(w.params is not None and w.params.shape == (2, 1, 6) for w in inserted_transformers(model).values())


def test_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    missing = [p for p in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"ONNX export test needs {', '.join(missing)} (pip install -e .[dev])")
    import onnxruntime as ort

    from stn_lightning.export import _exportable, _fold_constants

    torch.manual_seed(0)
    model = _model("test_resnet", 3).eval()
    insert_transformers(model, ["layer2", "layer3"], input_size=32, in_chans=3)
    _perturb(model, 0.05)
    example, x = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    # export.py's export_onnx takes the project's classifier, which returns (logits, params); a bare network is
    # exported the way it does it, with its backend switch (which reaches the inserted transformers) around the trace.
    with _exportable(model):
        assert all(w.transformer.backend == "torch" for w in inserted_transformers(model).values())
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert all(w.transformer.backend == "auto" for w in inserted_transformers(model).values())
    onnx_program = torch.onnx.export(
        program, (example,), input_names=["images"], output_names=["logits"], dynamo=True, optimize=False
    )
    assert onnx_program is not None
    _fold_constants(onnx_program.model)
    path = tmp_path / "inserted.onnx"
    onnx_program.save(str(path), external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=0)
