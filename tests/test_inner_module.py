"""Transformers inside the backbone through STNModule (``inner``): identity start, their own optimiser group and
clipping, warp statistics, and the attention pictures' regions in image pixels."""

from __future__ import annotations

import pytest
import torch

from stn_lightning.callbacks import inner_views
from stn_lightning.insertion import InnerTransformers
from stn_lightning.module import STNModule
from stn_lightning.tasks import SequenceReading

PLACES = ["conv1", "conv2", "conv3"]


def _modules() -> tuple[STNModule, STNModule]:
    options = dict(backbone="stn_sequence_cnn", fusion="none", image_size=32, task=SequenceReading(3))
    torch.manual_seed(0)
    plain = STNModule(**options)  # type: ignore[arg-type]
    torch.manual_seed(0)
    inner = STNModule(**options, inner=InnerTransformers(at=PLACES))  # type: ignore[arg-type]
    return plain, inner


def test_inner_transformers_start_at_the_identity() -> None:
    plain, inner = _modules()
    assert list(inner.inner_transformers) == PLACES
    # The same seed built the same backbone and head; insertion added the transformers after them.
    own = {k.replace(".module.", "."): v for k, v in inner.state_dict().items() if ".transformer." not in k}
    assert own.keys() == plain.state_dict().keys()
    plain.eval(), inner.eval()
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(inner(x), plain(x), atol=1e-5, rtol=1e-5)


def test_inner_transformers_train_in_the_localisation_group() -> None:
    _, inner = _modules()
    groups = {g["name"]: g["params"] for g in inner.parameter_groups()}
    loc = {id(p) for p in groups["localization"]}
    expected = {id(p) for w in inner.inner_transformers.values() for p in w.transformer.parameters()}
    assert loc == expected and loc.isdisjoint(id(p) for p in groups["model"])
    assert len(inner.localization_modules()) == len(PLACES)
    # One step's gradient reaches every localiser (their heads start at zero weights: perturb them first).
    with torch.no_grad():
        for wrapper in inner.inner_transformers.values():
            wrapper.transformer.head.weight.normal_(0.0, 0.01)
    y = torch.tensor([[1, 4, -1, -1], [2, 3, 5, -1], [3, 1, 2, 3], [1, 0, -1, -1]])
    inner.train()
    inner.task.loss(inner(torch.randn(4, 1, 32, 32)), y).backward()
    for place, wrapper in inner.inner_transformers.items():
        grads = [p.grad for p in wrapper.transformer.localizer.parameters()]
        assert all(g is not None and bool(g.abs().sum() > 0) for g in grads), place


def test_pictures_show_each_inner_region_in_image_pixels() -> None:
    _, inner = _modules()
    inner.eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        inner(images)
        regions, crops = inner_views(inner.model.backbone, images, crop=16)
    assert regions.shape[:2] == (2, len(PLACES)) and crops.shape == (2, len(PLACES), 1, 16, 16)
    # At the identity every place reads the whole image: corners at the image's outer pixel edges.
    corners = regions[..., :-1, :]
    assert float(corners[..., 0].min()) == pytest.approx(-0.5, abs=1e-4)
    assert float(corners[..., 0].max()) == pytest.approx(31.5, abs=1e-4)
    # ... and each crop is the image resampled at 16 x 16: its mean is the image's 2 x 2 block means' mean.
    expected = torch.nn.functional.avg_pool2d(images, 2)
    torch.testing.assert_close(crops[:, 0], expected, atol=1e-5, rtol=1e-5)
