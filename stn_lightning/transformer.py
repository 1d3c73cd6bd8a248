"""SpatialTransformer: K parallel transformers sharing one localisation trunk."""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from stn_lightning.kernels import Backend, Mode, Padding
from stn_lightning.kernels.reference import normalize_size

from .localization import PaperLocalizer, check_input_size
from .transforms import Affine, Transform, tiled_windows

__all__ = ["STOutput", "SpatialTransformer", "TransformerSpec", "object_config", "object_from_config"]


class STOutput(NamedTuple):
    """What a SpatialTransformer returns.

    Attributes:
        crops: (B, K, C, Ho, Wo), contiguous: ``crops.flatten(1, 2)`` is the (B, K*C, Ho, Wo) channel stack and
            ``crops.flatten(0, 1)`` the (B*K, C, Ho, Wo) batch of crops, both without a copy.
        params: (B, K, P) warp parameters, after the family's bounds.
    """

    crops: Tensor
    params: Tensor


@register_notrace_module
class SpatialTransformer(nn.Module):
    """K spatial transformers: a shared localisation net, one linear head giving K x P parameters, a sampler.

    The head starts at zero weights with its bias at the identity warp (``init="identity"``), or at K windows
    tiling the image (``init="tiled"``, the paper's start for parallel attention on CUB), so training starts
    from well-defined crops.

    The head is the paper's plain linear layer. With ``feature_norm=True`` the localisation features are first
    standardised over the batch (a BatchNorm1d without affine parameters). The raw features of a freshly
    initialised localiser vary little from image to image (on the bundled digits their per-feature spread over
    a batch is about 0.03, a third of their mean), so a gradient step on a plain head mostly moves the one warp
    that all images share: measured on the bundled digits, standardising makes the spread between images per
    unit of shared movement about ten times larger. It also makes the head's steps larger: alone, at the usual
    localisation rate, it threw the warp out of the image; with the localisation gradient clipped
    (``LocalizationTraining(grad_clip=1.0)``) it trains stably and is what makes the demo's transformer beat the
    baseline (benchmarks/RESULTS-training.md). Off by default in this building block, which keeps the paper's
    plain head; ``STNModule`` turns it on, with the clipped gradient and an Adam localiser, by default.

    Args:
        localizer: an ``nn.Module`` mapping (B, C, H, W) to features (B, F), with an ``out_features`` attribute.
        transform: the transformation family.
        num_transformers: K, the number of parallel transformers.
        output_size: crop size (Ho, Wo), or an int.
        init: "identity" or "tiled".
        init_scale: with ``init="identity"``, start at a centred window of this isotropic scale instead of the
            whole image (1.0, the paper's start). Below 1 the first crops zoom in: e.g. the crop/input ratio
            (0.5 for 30 x 30 crops of a 60 x 60 image) starts the crops at the input's own resolution.
        align_corners, padding_mode, mode: the sampler's conventions (see ``kernels``).
        background: the value that padding reads (the sampler's ``fill``), so that the padded border matches a
            normalised background instead of being 0; no copy of the image is made for it.
        backend: the sampler's backend ("auto", "torch" or "triton").
        feature_norm: standardise the localisation features before the head (see above).

    For torch.fx it is one module (a leaf): it is registered with timm's no-trace registry, so timm's FX feature
    extraction (``timm.layers.create_feature_extractor``, ``features_only=True, feature_cls="fx"``) keeps it whole in
    any network that holds one, and runs it, input checks included, as in eager mode. Other FX tracers
    (torchvision's ``create_feature_extractor``, ``torch.fx.symbolic_trace``) trace through its localiser and head
    and record its input check and its sampler as one call each (``torch.fx.wrap``), which the traced network runs
    as in eager mode. torch.export and torch.compile trace it.
    """

    def __init__(
        self,
        localizer: nn.Module,
        transform: Transform,
        num_transformers: int = 1,
        output_size: int | tuple[int, int] = 28,
        *,
        init: Literal["identity", "tiled"] = "identity",
        init_scale: float = 1.0,
        align_corners: bool = False,
        padding_mode: Padding = "zeros",
        mode: Mode = "bilinear",
        background: float = 0.0,
        backend: Backend = "auto",
        feature_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_transformers < 1:
            raise ValueError(f"expected num_transformers >= 1, got {num_transformers}")
        if init not in ("identity", "tiled"):
            raise ValueError(f"expected init 'identity' or 'tiled', got {init!r}")
        if not init_scale > 0:
            raise ValueError(f"expected init_scale > 0, got {init_scale}")
        features = getattr(localizer, "out_features", None)
        if not isinstance(features, int):
            raise ValueError(f"expected a localizer with an int attribute out_features, got {type(localizer).__name__}")
        self.localizer = localizer
        self.transform = transform
        self.num_transformers = num_transformers
        self.output_size = normalize_size(output_size)
        self.align_corners = align_corners
        self.padding_mode = padding_mode
        self.mode = mode
        self.background = float(background)
        self.backend = backend
        self.init_scale = float(init_scale)
        self.feature_norm = nn.BatchNorm1d(features, affine=False) if feature_norm else nn.Identity()
        self.head = nn.Linear(features, num_transformers * transform.num_params)
        self.reset_head(init)

    def reset_head(self, init: Literal["identity", "tiled"] = "identity") -> None:
        """Zero the head's weights and set its bias to the identity (a centred window of ``init_scale``) or to
        tiled windows."""
        k = self.num_transformers
        if init == "tiled":
            params = tiled_windows(self.transform, k)
        else:
            params = self.transform.window(self.init_scale, 0.0, 0.0).expand(k, -1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(self.transform.inverse(params).reshape(-1))

    def forward(self, x: Tensor) -> STOutput:
        """Crops (B, K, C, Ho, Wo) and parameters (B, K, P) of images (B, C, H, W)."""
        x = _checked_input(self.feature_norm, x)
        raw = self.head(self.feature_norm(self.localizer(x))).float()
        params = self.transform(raw.view(x.shape[0], self.num_transformers, -1))
        return STOutput(self.sample(x, params), params)

    def sample(self, x: Tensor, params: Tensor) -> Tensor:
        """Warp images (B, C, H, W) with given parameters (B, K, P) into crops (B, K, C, Ho, Wo)."""
        return _sampled(
            self.transform,
            x,
            params,
            self.output_size,
            self.align_corners,
            self.padding_mode,
            self.mode,
            self.background,
            self.backend,
        )

    def outline(self, params: Tensor, in_size: tuple[int, int], per_side: int = 16) -> Tensor:
        """Polygons (B, K, 4 * per_side + 1, 2) in input pixels of the regions that ``params`` (B, K, P) read."""
        return self.transform.outline(params, in_size, align_corners=self.align_corners, per_side=per_side)


# A tracer that does not keep SpatialTransformer whole (torchvision's create_feature_extractor without timm's leaves,
# torch.fx.symbolic_trace) traces the localiser and the head, and records each of these two calls as one node:
# torch.fx cannot trace the checks and the sampler's choice of backend (Python control flow on shapes and dtypes),
# and the traced network runs them as in eager mode. They take submodules, not the transformer, so that a
# transformer traced on its own (the root, which has no name to fetch) works too.
def _checked_input(feature_norm: nn.Module, x: Tensor) -> Tensor:
    if feature_norm.training and x.shape[0] == 1 and isinstance(feature_norm, nn.BatchNorm1d):
        raise ValueError(
            "feature_norm standardises the localisation features over the batch, and a training batch of one "
            "image has no spread; train with batches of 2 or more, or with feature_norm=False "
            "(--model.transformer.feature_norm false)"
        )
    return x


def _sampled(
    transform: Transform,
    x: Tensor,
    params: Tensor,
    output_size: tuple[int, int],
    align_corners: bool,
    padding_mode: Padding,
    mode: Mode,
    fill: float,
    backend: Backend,
) -> Tensor:
    return transform.sample(
        x,
        params,
        output_size,
        align_corners=align_corners,
        padding_mode=padding_mode,
        mode=mode,
        fill=fill,
        backend=backend,
    )


torch.fx.wrap("_checked_input")
torch.fx.wrap("_sampled")


def object_config(value: Any) -> Any:
    """An object option as plain data in LightningCLI's form, ``{"class_path": ..., "init_args": {...}}``: an
    instance whose ``__init__`` arguments are stored under their own names (a Transform), a class, or a
    ``functools.partial`` of a class (what LightningCLI makes of a callable given as class_path and init_args). Plain
    data is returned as it is; anything else (a lambda) raises ValueError."""
    if value is None or isinstance(value, (bool, int, float, str, dict)):
        return value
    if isinstance(value, functools.partial):
        cls = next((a for a in reversed(value.args) if isinstance(a, type)), value.func)
        if isinstance(cls, type):
            return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(value.keywords)}
    if isinstance(value, type):
        return {"class_path": f"{value.__module__}.{value.__qualname__}"}
    cls = type(value)
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind in plain][1:]
    if cls.__module__ != "__main__" and all(hasattr(value, n) for n in names):
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {n: getattr(value, n) for n in names},
        }
    raise ValueError(f"cannot store {value!r} as a class path and arguments; give it as a class or a partial of one")


def object_from_config(config: Any, call: bool = True) -> Any:
    """What :func:`object_config` stored: the instance (``call=True``), or the class or a partial of it with the stored
    arguments (``call=False``, for options that are callables). Anything that is not such a dict is returned as is."""
    if not (isinstance(config, dict) and "class_path" in config):
        return config
    module_name, _, name = str(config["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    kwargs = dict(config.get("init_args") or {})
    if call:
        return cls(**kwargs)
    return functools.partial(cls, **kwargs) if kwargs else cls


@dataclass(frozen=True)
class TransformerSpec:
    """How ``STNModule`` builds its SpatialTransformer once the data's channels, size and background are known.

    In YAML it is one block, ``model.transformer: {transform: ..., num_transformers: 2, crop_size: 28}``, of which
    only what differs from these defaults needs writing.

    Args:
        transform: the transformation family; default Affine().
        num_transformers: K, the number of parallel transformers.
        crop_size: size of each crop (Ho, Wo); default the input size.
        localizer: a callable taking in_chans and returning the localisation net; default PaperLocalizer.
        init: "identity" or "tiled" start of the transformers.
        init_scale: with ``init="identity"``, the scale of the centred window the transformers start at (1.0: the
            whole image, the paper's start). None (the default) takes the crop/input ratio, capped at 1: crops smaller
            than the input start zoomed in, at the input's own resolution (0.5 for 30 x 30 crops of a 60 x 60 image),
            and crops of the input's size start at the identity.
        feature_norm: standardise the localisation features before the transformers' head (see SpatialTransformer).
            On by default: with STNModule's clipped localisation gradient and Adam localiser it is the localisation
            recipe measured on the paper's digits (benchmarks/RESULTS-training.md); training batches then need at
            least two images.
        align_corners, padding_mode: the sampler's conventions.
        backend: the sampler's backend, "auto", "torch" or "triton".
        mode: the sampler's interpolation, "bilinear" or "nearest".
    """

    transform: Transform | None = None
    num_transformers: int = 1
    crop_size: int | tuple[int, int] | None = None
    localizer: Callable[[int], nn.Module] | None = None
    init: Literal["identity", "tiled"] = "identity"
    init_scale: float | None = None
    feature_norm: bool = True
    align_corners: bool = False
    padding_mode: Padding = "zeros"
    backend: Backend = "auto"
    mode: Mode = "bilinear"

    def __post_init__(self) -> None:
        if self.num_transformers < 1:
            raise ValueError(f"expected num_transformers >= 1, got {self.num_transformers}")

    def build(self, in_chans: int, image_size: tuple[int, int], background: float) -> SpatialTransformer:
        """The SpatialTransformer for images (B, in_chans, *image_size) whose empty pixel is ``background``."""
        crop = normalize_size(self.crop_size) if self.crop_size is not None else image_size
        init_scale = self.init_scale
        if init_scale is None:
            init_scale = min(1.0, max(c / s for c, s in zip(crop, image_size, strict=True)))
        loc = (self.localizer or PaperLocalizer)(in_chans)
        check_input_size(loc, torch.empty(0, in_chans, *image_size))
        return SpatialTransformer(
            loc,
            copy.deepcopy(self.transform) if self.transform is not None else Affine(),
            self.num_transformers,
            crop,
            init=self.init,
            init_scale=init_scale,
            feature_norm=self.feature_norm,
            align_corners=self.align_corners,
            padding_mode=self.padding_mode,
            background=background,
            backend=self.backend,
            mode=self.mode,
        )

    def config(self) -> dict[str, Any]:
        """The spec as plain data (the transform and the localiser as class paths and arguments): what checkpoints keep
        so that ``STNModule.load_from_checkpoint`` rebuilds the same transformer."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["transform"] = object_config(self.transform if self.transform is not None else Affine())
        out["localizer"] = object_config(self.localizer)
        if isinstance(self.crop_size, tuple):
            out["crop_size"] = list(self.crop_size)
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TransformerSpec:
        """The spec that :meth:`config` describes (also any dict of its fields, as YAML gives them)."""
        options = dict(config)
        options["transform"] = object_from_config(options.get("transform"))
        options["localizer"] = object_from_config(options.get("localizer"), call=False)
        if isinstance(options.get("crop_size"), list):
            options["crop_size"] = tuple(options["crop_size"])
        return cls(**options)
