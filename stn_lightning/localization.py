"""Localisation networks: image in, a feature vector out, from which a SpatialTransformer's head regresses warps.

Both end in adaptive pooling to a small fixed grid, so they accept any input of at least ``min_size`` pixels
and keep coarse position information (a global average would throw away where things are). Each exposes
``out_features`` and ``min_size``; the first argument of each is ``in_chans`` so that LightningCLI can inject
the data's channel count (``localizer: Callable[[int], nn.Module]``).
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import timm
import torch
from torch import Tensor, nn

__all__ = ["FeatureLocalizer", "PaperLocalizer", "TimmLocalizer", "check_input_size", "create_timm_model"]


def check_input_size(module: nn.Module, x: Tensor) -> None:
    """Raise ValueError when ``x`` (B, C, H, W) is smaller than ``module.min_size`` or has the wrong channels.

    Under ``torch.fx`` symbolic tracing ``x`` is a Proxy whose shape is unknown: nothing is checked, so that the
    module traces (torch.export and torch.compile see real shapes and check them).
    """
    if isinstance(x, torch.fx.Proxy):
        return
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    in_chans, min_size = getattr(module, "in_chans", None), getattr(module, "min_size", 1)
    if in_chans is not None and x.shape[1] != in_chans:
        raise ValueError(f"{type(module).__name__} expected {in_chans} input channels, got {x.shape[1]}")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(
            f"{type(module).__name__} accepts images of at least {min_size} x {min_size} pixels, "
            f"got {x.shape[-2]} x {x.shape[-1]}"
        )


def create_timm_model(name: str, *, pretrained: bool | str | None = None, **kwargs: Any) -> Any:
    """``timm.create_model`` with a friendly error for unknown names, and pretrained weights from timm or a file.

    Args:
        name: any timm model name.
        pretrained: True for timm's published weights of ``name`` (downloaded once by timm, from the Hugging Face
            Hub, into its cache: needs a network connection the first time), a path of a local weights file
            (nothing is downloaded), or None / False for random initialisation.
        **kwargs: passed to ``timm.create_model`` (num_classes, in_chans, ...).
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest valid names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ValueError(f"unknown timm model {name!r}{hint}")
    if pretrained is None or pretrained is False:
        return timm.create_model(name, pretrained=False, **kwargs)  # type: ignore[arg-type]
    if pretrained is True:
        return timm.create_model(name, pretrained=True, **kwargs)  # type: ignore[arg-type]
    if not os.path.isfile(pretrained):
        raise ValueError(f"pretrained weights {pretrained!r}: no such file (use true for timm's published weights)")
    return timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(pretrained)},
        **kwargs,  # type: ignore[arg-type]
    )


class PaperLocalizer(nn.Module):
    """The paper's small CNN: two 5x5 convolutions with max-pooling, then a fully connected layer.

    conv(5x5) -> maxpool(2) -> ReLU -> conv(5x5) -> maxpool(2) -> ReLU -> adaptive average pool (pool x pool)
    -> linear(hidden) -> ReLU. Inputs of 16 pixels or more work.

    Args:
        in_chans: input channels.
        channels: widths of the two convolutions.
        hidden: size of the output feature vector.
        pool: side of the adaptive pooling grid.
    """

    min_size = 16

    def __init__(self, in_chans: int, channels: tuple[int, int] = (20, 20), hidden: int = 50, pool: int = 4) -> None:
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"expected in_chans >= 1, got {in_chans}")
        self.in_chans = in_chans
        self.out_features = hidden
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(c2 * pool * pool, hidden),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Features (B, hidden) of images (B, C, H, W)."""
        check_input_size(self, x)
        return self.features(x)


class FeatureLocalizer(nn.Module):
    """A small fully connected localisation net for feature maps of any size, for transformers inside a network.

    adaptive average pool (pool x pool) -> flatten -> linear(hidden) -> ReLU -> linear(hidden) -> ReLU: the paper's
    localisers of the SVHN "ST-CNN Multi", which puts a transformer before each of the first four convolutional
    layers, are two fully connected layers of 32 units. The pooling makes it accept maps of any size (1 x 1 and
    up; smaller maps are repeated into the grid) and keeps their coarse layout.

    Args:
        in_chans: channels of the feature map.
        hidden: width of both fully connected layers, the size of the output feature vector.
        pool: side of the adaptive pooling grid.
    """

    min_size = 1

    def __init__(self, in_chans: int, hidden: int = 32, pool: int = 4) -> None:
        super().__init__()
        if min(in_chans, hidden, pool) < 1:
            raise ValueError(f"expected in_chans, hidden and pool >= 1, got {in_chans}, {hidden} and {pool}")
        self.in_chans = in_chans
        self.out_features = hidden
        self.features = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(in_chans * pool * pool, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Features (B, hidden) of feature maps (B, C, h, w)."""
        check_input_size(self, x)
        return self.features(x)


class TimmLocalizer(nn.Module):
    """A localisation net on any convolutional timm backbone: its feature map, pooled to pool x pool, then a
    linear layer.

    Args:
        in_chans: input channels.
        model_name: a timm model whose ``forward_features`` returns a (B, F, h, w) map (CNNs).
        pretrained: True for timm's published weights, a path of a local weights file, or None.
        hidden: size of the output feature vector.
        pool: side of the adaptive pooling grid.
    """

    min_size = 32

    def __init__(
        self,
        in_chans: int,
        model_name: str = "resnet18",
        pretrained: bool | str | None = None,
        hidden: int = 128,
        pool: int = 2,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.out_features = hidden
        backbone = create_timm_model(model_name, pretrained=pretrained, num_classes=0, in_chans=in_chans)
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(backbone.num_features * pool * pool, hidden), nn.ReLU(inplace=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Features (B, hidden) of images (B, C, H, W)."""
        check_input_size(self, x)
        fmap = self.backbone.forward_features(x)
        if not isinstance(fmap, torch.fx.Proxy) and fmap.dim() != 4:
            raise ValueError(
                f"TimmLocalizer needs a backbone with a (B, F, h, w) feature map, got {tuple(fmap.shape)}; "
                "use a convolutional model"
            )
        return self.fc(self.pool(fmap))
