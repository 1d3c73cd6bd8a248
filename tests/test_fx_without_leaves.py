"""Networks with spatial transformers through FX tracers that know nothing of timm's leaves.

torchvision's ``create_feature_extractor`` and ``torch.fx.symbolic_trace`` trace through every module that is not
a plain ``torch.nn`` layer. SpatialTransformer and InsertedTransformer record what cannot be traced (input checks,
the sampler) as one call each, so these tracers work with no ``tracer_kwargs``, and the traced network computes
what the eager one does, input checks and kept parameters included.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from stn_lightning.insertion import insert_transformers, inserted_transformers
from stn_lightning.localization import FeatureLocalizer
from stn_lightning.transformer import SpatialTransformer
from stn_lightning.transforms import Affine, Projective


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class _Warped(nn.Module):
    # A stage with a spatial transformer in front of it, put there by hand.
    def __init__(self, channels: int, size: int, stage: nn.Module) -> None:
        super().__init__()
        self.st = SpatialTransformer(FeatureLocalizer(channels), Projective(), output_size=size, feature_norm=True)
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        return self.stage(self.st(x).crops[:, 0])


def _off_identity(transformer: SpatialTransformer, seed: int) -> None:
    # Off the identity, so that a traced sampler that did nothing would show.
    with torch.no_grad():
        noise = torch.randn(transformer.head.bias.shape, generator=torch.Generator().manual_seed(seed))
        transformer.head.bias.add_(0.1 * noise)


def test_torchvision_extracts_features_of_a_resnet_with_a_transformer_by_hand() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    model.layer3 = _Warped(128, 4, model.layer3)  # layer3 reads layer2's 128 x 4 x 4 map at 32 px
    _off_identity(model.layer3.st, 1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    train_nodes, eval_nodes = get_graph_node_names(model)
    # Traced through: the localiser's layers are nodes of their own, the sampler one call.
    assert "layer3.st.localizer.features.2" in eval_nodes and "layer3.st._sampled" in eval_nodes
    assert eval_nodes == train_nodes
    extractor = create_feature_extractor(model, ["layer3.st.localizer.features.2", "layer3.st._sampled", "fc"])
    out = extractor(x)
    assert torch.equal(out["fc"], model(x))
    layer2 = model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    assert torch.equal(out["layer3.st._sampled"], model.layer3.st(layer2).crops)
    assert not torch.equal(out["layer3.st._sampled"][:, 0], layer2)  # the warp is not the identity
    # The input check runs in the traced network: in training mode feature_norm needs a batch of 2 or more.
    extractor.train()
    with pytest.raises(ValueError, match="batch of one"):
        extractor(x[:1])


def test_torch_fx_symbolic_trace_of_a_spatial_transformer() -> None:
    torch.manual_seed(0)
    transformer = SpatialTransformer(FeatureLocalizer(3), Affine(), num_transformers=2, output_size=6)
    _off_identity(transformer, 2)
    transformer.eval()
    x = torch.randn(2, 3, 12, 12)
    traced = torch.fx.symbolic_trace(transformer)
    crops, params = traced(x)
    expected = transformer(x)
    assert torch.equal(crops, expected.crops) and torch.equal(params, expected.params)


def test_torchvision_extracts_features_of_a_network_with_inserted_transformers() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    insert_transformers(model, ["layer2", "layer3"], Affine(), input_size=32, in_chans=3)
    wrappers = inserted_transformers(model)
    for i, wrapper in enumerate(wrappers.values()):
        _off_identity(wrapper.transformer, 3 + i)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    extractor = create_feature_extractor(model, ["layer2", "layer3", "fc"])
    out = extractor(x)
    expected = model.forward_intermediates(x, indices=[2, 3], intermediates_only=True)
    assert torch.equal(out["layer2"], expected[0]) and torch.equal(out["layer3"], expected[1])
    assert torch.equal(out["fc"], model(x))
    # The traced network runs the transformers themselves: their parameters are kept, and in training mode the
    # loss reaches their localisers.
    for wrapper in wrappers.values():
        wrapper.params = None
    extractor.train()
    sum(v.sum() for v in extractor(x).values()).backward()
    for wrapper in wrappers.values():
        assert wrapper.params is not None and wrapper.params.shape == (2, 1, 6)
        assert wrapper.transformer.localizer.features[2].weight.grad is not None
