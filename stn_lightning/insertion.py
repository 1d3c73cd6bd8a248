"""Spatial transformers on feature maps, inserted in front of named submodules of any network.

The paper's ST-CNN Multi (SVHN) puts a spatial transformer before each of the first four convolutional layers:
each one warps the feature map that reaches its layer, with a localiser of its own reading that map.
:func:`insert_transformers` does this to any ``nn.Module`` (a timm model, the paper's CNN, your own network): it
finds the channels and size of the map at each named place with one probing forward, then replaces each submodule
by an :class:`InsertedTransformer`, which warps the map and passes it on to the original submodule. Every
transformer starts at the identity warp, so right after insertion the network computes what it computed before
(to float32 rounding), pretrained weights included; training then learns where each layer looks.

    model = timm.create_model("resnet18", num_classes=10)
    insert_transformers(model, ["layer2", "layer3"], Affine(), input_size=64, in_chans=3)
    logits = model(images)  # as before
    params = {name: w.params for name, w in inserted_transformers(model).items()}  # (B, 1, 6) each
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from stn_lightning.kernels import Backend, Mode, Padding
from stn_lightning.kernels.reference import normalize_size

from .localization import FeatureLocalizer
from .transformer import SpatialTransformer
from .transforms import Affine, Transform, outline_square, to_pixels

__all__ = [
    "InnerTransformers",
    "InsertedTransformer",
    "inner_points",
    "inner_regions",
    "insert_transformers",
    "inserted_transformers",
]


@register_notrace_module
class InsertedTransformer(nn.Module):
    """A SpatialTransformer in front of one submodule of a network: ``forward(x) = module(transformer(x).crops[:, 0])``.

    Extra positional and keyword arguments of the call go to the submodule unchanged; only the first input, the
    feature map (B, C, h, w), is warped.

    Attributes:
        transformer: the SpatialTransformer, with one transformer (K = 1).
        module: the original submodule.
        params: the warp parameters (B, 1, P) of the last forward, or None before the first. They are kept with their
            autograd graph, so that a loss or penalty computed after the forward (e.g. a penalty on the scale)
            reaches the localiser; read them after each forward, as the next one replaces them. They are not
            saved in the state dict nor copied by ``copy.deepcopy`` or pickling (the copy's are None), and not
            stored while ``torch.export`` traces the network.

    For torch.fx it is one module (a leaf), registered with timm's no-trace registry like SpatialTransformer: timm's
    FX feature extraction returns its output under the name of the place (``layer2``). Tracers that trace through it
    (torchvision's ``create_feature_extractor``) trace the submodule and record the transformer as one call. Either
    way its ``params`` are set as in eager mode when the traced network runs.

    Args:
        transformer: a SpatialTransformer with ``num_transformers=1``.
        module: the submodule that reads the warped map.
    """

    params: Tensor | None

    def __init__(self, transformer: SpatialTransformer, module: nn.Module) -> None:
        super().__init__()
        if transformer.num_transformers != 1:
            raise ValueError(f"expected a transformer with num_transformers=1, got {transformer.num_transformers}")
        self.transformer = transformer
        self.module = module
        self.params = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The submodule's output on the warped map (B, C, Ho, Wo) of ``x`` (B, C, h, w)."""
        return self.module(_warped_and_kept(self, x), *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy and pickle go through here: a non-leaf tensor with a graph cannot be deep-copied.
        state = super().__getstate__()  # type: ignore[misc]
        return {**state, "params": None}


def _warped_and_kept(wrapper: InsertedTransformer, x: Tensor) -> Tensor:
    # One node for tracers that trace through InsertedTransformer (torch.fx.wrap below): the traced network runs the
    # transformer and sets ``params`` as in eager mode.
    crops, params = wrapper.transformer(x)
    if not torch.compiler.is_exporting():  # torch.export warns of tensor attributes set while it traces
        wrapper.params = params
    # The warped map leaves in the layout the map came in: in a channels-last network (a CPU trainer) the next
    # convolution would otherwise convert it, and every op behind it would convert its gradient back.
    cl = torch.channels_last
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=cl) and not x.is_contiguous():
        return crops[:, 0].contiguous(memory_format=cl)
    return crops[:, 0]


torch.fx.wrap("_warped_and_kept")


def inserted_transformers(model: nn.Module) -> dict[str, InsertedTransformer]:
    """The InsertedTransformers of ``model`` by their place (the dotted name of the submodule they stand for), in
    the order of ``model.named_modules()`` (for sequential backbones, the order of the forward)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, InsertedTransformer)}


def insert_transformers(
    model: nn.Module,
    at: Sequence[str],
    transform: Transform | None = None,
    *,
    input_size: int | tuple[int, int],
    in_chans: int,
    localizer: Callable[[int], nn.Module] | None = None,
    output_size: int | tuple[int, int] | None = None,
    init_scale: float = 1.0,
    align_corners: bool = False,
    padding_mode: Padding = "zeros",
    mode: Mode = "bilinear",
    background: float = 0.0,
    backend: Backend = "auto",
    feature_norm: bool = False,
) -> nn.Module:
    """Put a spatial transformer in front of each named submodule of ``model``, in place.

    One forward of zero images (2, in_chans, H, W), in eval mode and without gradients, finds the feature map
    (B, C, h, w) that reaches each place (the modes of all submodules are restored afterwards). Each place then
    gets a SpatialTransformer with one transformer at the identity warp, a localiser for C channels and an output
    of h x w (or ``output_size``), and the submodule is replaced by an :class:`InsertedTransformer` around it. With
    the default output size the network's output is unchanged after insertion, to float32 rounding. The new modules
    take the device and dtype of the model's parameters.

    Load pretrained weights before inserting: a replaced submodule's state-dict keys gain ``module.`` after its name
    (``layer2.0.conv1.weight`` becomes ``layer2.module.0.conv1.weight``), and the transformers add their own.

    Args:
        model: any ``nn.Module`` taking images (B, in_chans, H, W).
        at: dotted names of submodules, as ``model.named_modules()`` gives them: e.g. ``["layer2", "layer3"]`` for
            a ResNet, ``["stages.1"]`` for a ConvNeXt, ``["blocks.1"]`` for an EfficientNet.
        transform: the transformation family; each place gets its own copy. Default :class:`Affine`.
        input_size: (H, W) of the model's images, or an int.
        in_chans: channels of the model's images.
        localizer: called with the channels of the map at a place, returns that place's localisation net (an
            ``nn.Module`` with ``out_features``); default :class:`FeatureLocalizer`.
        output_size: size of the warped maps, or an int; default the size of the map at each place.
        init_scale, align_corners, padding_mode, mode, background, backend, feature_norm: as for
            :class:`SpatialTransformer` (``init_scale`` below 1 starts zoomed in, so the output changes).

    Returns:
        ``model`` itself, modified.

    Raises:
        ValueError: naming the place, for a name that is not a submodule (with close names), a duplicate, a place
            inside another, the model itself, or a place whose first input is not a (B, C, h, w) map.
    """
    if isinstance(at, str):
        raise ValueError(f"expected a list of submodule names, got the string {at!r}; write [{at!r}]")
    names = list(at)
    _check_places(model, names)
    first = next(model.parameters(), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    shapes = _map_shapes(
        model, names, torch.zeros(2, in_chans, *normalize_size(input_size), device=device, dtype=dtype)
    )
    transform = Affine() if transform is None else transform
    make_localizer = FeatureLocalizer if localizer is None else localizer
    for name in names:
        _, chans, h, w = shapes[name]
        transformer = SpatialTransformer(
            make_localizer(chans),
            copy.deepcopy(transform),
            num_transformers=1,
            output_size=(h, w) if output_size is None else output_size,
            init="identity",
            init_scale=init_scale,
            align_corners=align_corners,
            padding_mode=padding_mode,
            mode=mode,
            background=background,
            backend=backend,
            feature_norm=feature_norm,
        ).to(device=device, dtype=dtype)
        parent, _, last = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        # Module.__setattr__ replaces the registered child, also the string indices of Sequential and ModuleList.
        setattr(owner, last, InsertedTransformer(transformer, model.get_submodule(name)))
    return model


def _check_places(model: nn.Module, names: list[str]) -> None:
    if not names:
        raise ValueError("expected at least one submodule name to insert a transformer at")
    known = {name for name, _ in model.named_modules() if name}
    for i, name in enumerate(names):
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else "; see model.named_modules()"
            raise ValueError(f"no submodule named {name!r} in {type(model).__name__}{hint}")
        if name in names[:i]:
            raise ValueError(f"submodule {name!r} is named twice")
    for name in names:
        for other in names:
            if other.startswith(name + "."):
                raise ValueError(f"submodule {other!r} is inside {name!r}: name one of them")


def _map_shapes(model: nn.Module, names: list[str], images: Tensor) -> dict[str, tuple[int, int, int, int]]:
    """The shape (B, C, h, w) of the first input that each named submodule gets in a forward of ``images``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in shapes:  # a submodule called twice: its first call
                first = args[0] if args else None
                shapes[name] = tuple(first.shape) if isinstance(first, Tensor) else ()

        return hook

    training = {m: m.training for m in model.modules()}
    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in training.items():
            m.training = mode
    for name in names:
        if name not in shapes:
            raise ValueError(f"submodule {name!r} is not called in the model's forward")
        if len(shapes[name]) != 4:
            got = f"an input of shape {shapes[name]}" if shapes[name] else "no tensor as its first input"
            raise ValueError(f"submodule {name!r} gets {got}, not a feature map (B, C, h, w)")
    return {name: (shapes[name][0], shapes[name][1], shapes[name][2], shapes[name][3]) for name in names}


def inner_regions(
    model: nn.Module, image_size: int | tuple[int, int], per_side: int = 4, compose: bool = True
) -> dict[str, Tensor]:
    """The region of the input images that each inserted transformer read in the model's last forward.

    Normalised coordinates do not depend on resolution: [-1, 1]^2 spans a feature map as it spans the image, so a
    transformer's outline drawn at the image's size is where it reads in image pixels (with ``align_corners=False``,
    up to the offsets of less than a stride that the layers in between shift a map by).
    A transformer behind another one, however, reads a map that is already warped: with ``compose`` (default)
    its outline is mapped back through every earlier transformer, in the order of :func:`inserted_transformers`,
    which is right when the places lie one after another on the network's path (the stages of a backbone, the
    paper's ST-CNN Multi); ``compose=False`` gives each outline in the frame of its own input map.

    Args:
        model: a model with inserted transformers (:func:`insert_transformers`).
        image_size: (H, W) of the images, or an int.
        per_side: points per side of each outline.
        compose: map each outline back through the transformers before it.

    Returns:
        For each place whose transformer has run (``params`` not None), a closed polygon (B, 1, 4 * per_side + 1, 2)
        of (x, y) image pixel coordinates, pixel centres at integers; detached from the graph.
    """
    size = normalize_size(image_size)
    square = outline_square(per_side)
    return {
        name: to_pixels(pts, size, wrapper.transformer.align_corners)
        for (name, pts), wrapper in zip(
            inner_points(model, size, square, compose).items(), _ran(model).values(), strict=True
        )
    }


def inner_points(
    model: nn.Module, image_size: int | tuple[int, int], points: Tensor, compose: bool = True
) -> dict[str, Tensor]:
    """Where given points of each inserted transformer's output read, in the input image (see :func:`inner_regions`).

    Args:
        model: a model with inserted transformers that has run a forward.
        image_size: (H, W) of the images, or an int.
        points: (N, 2) normalised (x, y) points of a transformer's output frame (the same for every place).
        compose: map them back through the transformers before each place.

    Returns:
        For each place whose transformer has run, (B, 1, N, 2) normalised points of the image; detached.
    """
    size = normalize_size(image_size)
    found: dict[str, Tensor] = {}
    earlier: list[tuple[Transform, Tensor]] = []
    for name, wrapper in _ran(model).items():
        params, st = cast(Tensor, wrapper.params).detach().float(), wrapper.transformer
        pts = st.transform.points(params, points.to(params.device), size)  # (B, 1, N, 2), normalised
        for transform, before in reversed(earlier if compose else []):
            pts = _points_per_image(transform, before, pts, size)
        found[name] = pts
        earlier.append((st.transform, params))
    return found


def _ran(model: nn.Module) -> dict[str, InsertedTransformer]:
    # The inserted transformers that have run a forward (their params are set).
    return {name: w for name, w in inserted_transformers(model).items() if w.params is not None}


def _points_per_image(transform: Transform, params: Tensor, pts: Tensor, size: tuple[int, int]) -> Tensor:
    # Points (B, 1, M, 2) in the frame of a transformer's output -> its input, each image through its own warp.
    return torch.cat([transform.points(params[i : i + 1], pts[i, 0], size) for i in range(pts.shape[0])])


class InnerTransformers:
    """Where to put spatial transformers inside a backbone, and how to build them: the YAML face of
    :func:`insert_transformers`, for ``STNModule(inner=...)`` and ``STNClassifier(inner=...)``.

    Calling it on a backbone inserts the transformers (after the backbone's pretrained weights are loaded), with the
    input's size and channels the classifier knows::

        model:
          backbone: stn_sequence_cnn
          fusion: none
          inner:
            class_path: stn_lightning.insertion.InnerTransformers
            init_args:
              at: [conv1, conv2, conv3, conv4]

    Args:
        at: dotted names of the submodules to put a transformer in front of.
        transform: the transformation family (each place gets its own copy); default Affine.
        localizer: called with a place's channels, returns its localisation net; default FeatureLocalizer.
        init_scale, align_corners, padding_mode, backend, feature_norm: as for :func:`insert_transformers`.
    """

    def __init__(
        self,
        at: list[str],
        transform: Transform | None = None,
        localizer: Callable[[int], nn.Module] | None = None,
        init_scale: float = 1.0,
        align_corners: bool = False,
        padding_mode: Padding = "zeros",
        backend: Backend = "auto",
        feature_norm: bool = False,
    ) -> None:
        if isinstance(at, str) or not at:
            raise ValueError(f"expected a non-empty list of submodule names, got {at!r}")
        self.at = list(at)
        self.transform = transform
        self.localizer = localizer
        self.options: dict[str, Any] = {
            "init_scale": init_scale,
            "align_corners": align_corners,
            "padding_mode": padding_mode,
            "backend": backend,
            "feature_norm": feature_norm,
        }

    def __call__(self, model: nn.Module, *, input_size: tuple[int, int], in_chans: int) -> nn.Module:
        """Insert the transformers into ``model`` (in place) for images (B, in_chans, *input_size); returns it."""
        return insert_transformers(
            model,
            self.at,
            self.transform,
            input_size=input_size,
            in_chans=in_chans,
            localizer=self.localizer,
            **self.options,
        )
