"""The paper's own classification networks (Jaderberg et al. 2015) as timm models.

Importing this module (``import stn_lightning`` does) registers five models with timm, so that
``timm.create_model(name, num_classes=..., in_chans=...)`` and ``STNModule(backbone=name)`` build them like any
timm model:

* ``stn_paper_cnn``: conv 9x9 32 -> max-pool 2 -> conv 7x7 32 -> adaptive max-pool 4x4 -> fully connected;
  57,962 parameters (1 channel, 10 classes).
* ``stn_paper_cnn_st``: the same with 23 filters per convolution; 31,520 (+ 26,896 of the localiser = 58,416).
* ``stn_paper_fcn``: 28x28 input grid -> fc 128 -> fc 128 -> fully connected; 118,282.
* ``stn_paper_fcn_st``: 28x28 input grid -> fc 102 -> fc 102 -> fully connected; 91,606 (+ 26,896 = 118,502).
* ``stn_sequence_cnn``: a small house-number reader for the sequence experiments (:class:`SequenceCNN`).

They meet timm's model contract (tests/test_timm_contract.py runs timm's model checks on each, TorchScript
aside): a default config with everything timm's tools read (input size, mean and std, interpolation and crop,
pool size, first layer and classifier names); ``forward_features`` / ``forward_head(pre_logits=)``,
``num_features`` (the channels of ``forward_features``' output) and ``head_hidden_size`` (the width of the flat
features the classifier reads); ``reset_classifier`` and ``get_classifier``, where ``reset_classifier(0, "")``
(or ``global_pool=""``) makes ``forward`` return the unflattened features, since these networks have no global pool
(their head flattens the pooled map, ``global_pool="flatten"``). The CNNs add ``feature_info`` (the convolution
stages and, for the paper's CNN, the pooled grid), ``features_only=True`` through timm's feature extractors
(``forward_intermediates`` by default, and the module-list, hook and FX ones), ``forward_intermediates`` and
``prune_intermediate_layers``. The FCNs have no spatial map: ``features_only=True`` raises a ValueError that says
so. Every network traces with ``torch.fx.symbolic_trace`` and timm's FX tools: the input checks raise their
ValueErrors in eager mode and step aside for FX tracing, whose Proxies have no shape (torch.export, torch.compile
and the ONNX export trace with real shapes, and the checks run there as in eager mode).

The baselines (``*_cnn``, ``*_fcn``) are the CNN and FCN rows of the paper's tables. The paper compares each
with an ST network of about the same total size: the ST side adds a localisation network in front of the
classifier, so its classifier must be smaller. The ``*_st`` variants are sized for that: with the project's
default localiser, ``PaperLocalizer(1)`` (two 5x5 convolutions of 20 filters, 4x4 pooling, fc 50: 26,590
parameters) and an affine head of one transformer (50 x 6 + 6 = 306), an ST-CNN built with
``stn_paper_cnn_st`` has 58,416 parameters against the CNN's 57,962 (+0.8 %), and an ST-FCN with
``stn_paper_fcn_st`` 118,502 against the FCN's 118,282 (+0.2 %). The widths were solved for here from these
counts (49 c^2 + 243 c + 10 for the CNN with c filters per convolution, h^2 + 796 h + 10 for the FCN with two
hidden layers of h units); docs/PAPER.md gives the CNN's layers, and the paper only states that the compared
models have about the same number of parameters. The FCN's two hidden layers of 128 units are this project's
choice. The paper's ST-FCN used a fully connected localiser; here every localiser is injected separately
(``STNModule(transformer=TransformerSpec(localizer=...))``), so other pairings re-balance by passing widths through
``backbone_kwargs`` (``channels=(c1, c2)`` or ``hidden=(h1, h2, ...)``).

The counts above include the classifier. In ``STNClassifier`` the backbone is built with ``num_classes=0`` and
the classifier is the model's own head of the same size; with feature fusion of K crops that head is K times
wider, and with channel fusion the first layer sees K * C channels, so those models grow accordingly.

Both networks stay position-sensitive (no global average pooling) and accept any input of at least
``min_size`` pixels: the CNN's second max-pooling is adaptive and pools its map to a fixed 4x4 grid (the
paper's 2x2 pooling for 36x36 inputs), and the FCN first resamples the image to a fixed 28x28 grid by area
averaging (adaptive average pooling, the identity on 28x28 digits). The fully connected layers, and with them
the parameter counts, therefore do not depend on the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

__all__ = ["PaperCNN", "PaperFCN", "SequenceCNN"]

# Mean and std of MNIST pixels in [0, 1], as stn_lightning.data normalises them.
_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
# The side of the paper networks' default input (MNIST digits).
_DEFAULT_SIZE = 28
# What the networks accept as global_pool: they never pool globally (see _PaperNet).
_GLOBAL_POOLS = ("flatten", "")


def _check_classes(num_classes: int, in_chans: int) -> None:
    if num_classes < 0 or in_chans < 1:
        raise ValueError(f"expected num_classes >= 0 and in_chans >= 1, got {num_classes} and {in_chans}")


def _check_head(name: str, num_classes: int, global_pool: str) -> None:
    if global_pool not in _GLOBAL_POOLS:
        raise ValueError(
            f"{name} keeps its spatial layout and has no global pool: expected global_pool 'flatten' (the classifier "
            f"reads the flattened features) or '' (no head: the unflattened features), got {global_pool!r}"
        )
    if global_pool == "" and num_classes > 0:
        raise ValueError(
            f"global_pool '' leaves {name}'s features unflattened, so no classifier can read them: it needs "
            f"num_classes=0, got {num_classes}"
        )


def _take_indices(count: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """The feature levels (0 .. count - 1) that timm's ``indices`` select, and the last of them.

    None takes every level, an int n the last n, a sequence the levels it names (negative ones count from the end).
    """
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"expected to take the last 1 to {count} feature levels, got {indices}")
        take = list(range(count - indices, count))
    else:
        wrong = [i for i in indices if not -count <= i < count]
        if wrong or not indices:
            raise ValueError(f"expected feature levels in [-{count}, {count - 1}], got {list(indices)}")
        take = [i % count for i in indices]
    return take, max(take)


def _is_traced(x: Tensor) -> bool:
    # torch.fx.symbolic_trace passes Proxies, whose shapes are unknown: a Python check on them cannot run.
    return isinstance(x, torch.fx.Proxy)


class _PaperNet(nn.Module):
    """What every network here shares: the timm classifier interface around ``forward_features`` and ``head``.

    The head is ``global_pool`` (these networks never pool globally: "flatten" flattens the features for the
    classifier, "" keeps them as they are and leaves no classifier), then :meth:`_pre_logits` (the flat features,
    (B, head_hidden_size)), dropout and the fully connected classifier ``head``. Subclasses set ``in_chans``,
    ``num_features``, ``head_hidden_size`` and ``min_size``, build the head with :meth:`_make_head` and implement
    :meth:`forward_features`.
    """

    in_chans: int
    num_classes: int
    num_features: int
    head_hidden_size: int
    min_size: int
    drop_rate: float
    global_pool: str
    head: nn.Module

    def _make_head(self, num_classes: int, global_pool: str) -> None:
        _check_classes(num_classes, self.in_chans)
        _check_head(type(self).__name__, num_classes, global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: Tensor) -> None:
        if _is_traced(x):
            return
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"{type(self).__name__} accepts images of at least {self.min_size} x {self.min_size} pixels, "
                f"got {x.shape[-2]} x {x.shape[-1]}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """Features of images (B, in_chans, H, W), before the head (shape per subclass)."""
        raise NotImplementedError

    def _pre_logits(self, x: Tensor) -> Tensor:
        """The flat features (B, head_hidden_size) that the classifier reads, from :meth:`forward_features`."""
        return x.flatten(1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits (B, num_classes) of features from :meth:`forward_features`, or the flat features
        (B, head_hidden_size) that the classifier reads when ``pre_logits`` (or when num_classes is 0). With
        ``global_pool=""`` the features come back as :meth:`forward_features` gave them."""
        if self.global_pool:
            x = self._pre_logits(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images (B, in_chans, H, W); with num_classes 0 the flat features
        (B, head_hidden_size), or with ``global_pool=""`` the features of :meth:`forward_features`."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final fully connected layer (an ``nn.Identity`` when num_classes is 0)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0 removes it).

        Args:
            num_classes: outputs of the new classifier.
            global_pool: "flatten" (the classifier reads the flattened features), "" (no flattening, so no
                classifier: ``reset_classifier(0, "")`` makes ``forward`` return the unflattened features, as timm
                models return their unpooled map) or None to keep the current one. These networks never pool
                globally: any other value is an error.
        """
        self._make_head(num_classes, self.global_pool if global_pool is None else global_pool)


class _ConvNet(_PaperNet):
    """A convolutional network with timm's feature interface: ``feature_info``, ``forward_intermediates`` and
    ``prune_intermediate_layers``.

    Subclasses name their modules in order: ``_levels`` holds, for each entry of ``feature_info``, the submodules
    that lead from the previous level to it; ``_tail`` the submodules after the last level that ``forward_features``
    still runs; ``_head_layers`` the head's own layers before the classifier (those that :meth:`_pre_logits` runs).
    """

    feature_info: list[dict[str, Any]]
    _levels: tuple[tuple[str, ...], ...]
    _tail: tuple[str, ...] = ()
    _head_layers: tuple[str, ...] = ()

    def _run(self, names: tuple[str, ...], x: Tensor) -> Tensor:
        for name in names:
            x = getattr(self, name)(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """The map (B, num_features, *pool_size) of images (B, in_chans, H, W), before the head."""
        self._check_input(x)
        for names in self._levels:
            x = self._run(names, x)
        return self._run(self._tail, x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The feature maps of ``feature_info``'s levels, with timm's signature.

        Args:
            x: images (B, in_chans, H, W).
            indices: the levels to return: None for all, an int n for the last n, or a sequence of levels (negative
                ones count from the end).
            norm: accepted for timm's interface; these networks have no final norm to apply.
            stop_early: stop after the last level asked for (the returned final map is then that level's).
            output_fmt: "NCHW", the only layout.
            intermediates_only: return only the list of maps.

        Returns:
            The maps (B, num_chs, h, w) of the levels asked for, in order; unless ``intermediates_only``, after the
            final map, which equals :meth:`forward_features` (when not stopped early).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__} returns NCHW feature maps only, got output_fmt {output_fmt!r}")
        take, last = _take_indices(len(self._levels), indices)
        self._check_input(x)
        intermediates = []
        for i, names in enumerate(self._levels):
            if stop_early and i > last:
                break
            x = self._run(names, x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if not stop_early or last == len(self._levels) - 1:
            x = self._run(self._tail, x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove what the levels ``indices`` do not need, as timm's feature extractors do (in place).

        The levels after the last one asked for become identities, and with them the final pooling; the head (its
        hidden layers and the classifier) goes with ``prune_head`` or when the network ends early, after which
        ``forward`` returns the last kept map and ``num_features`` and ``head_hidden_size`` are its channels.

        Args:
            indices: the levels to keep, as for :meth:`forward_intermediates`.
            prune_norm: accepted for timm's interface; there is no final norm.
            prune_head: remove the head.

        Returns:
            The levels kept, as absolute indices.
        """
        take, last = _take_indices(len(self._levels), indices)
        prune_end = last < len(self._levels) - 1
        if prune_end:
            for names in (*self._levels[last + 1 :], self._tail):
                for name in names:
                    setattr(self, name, nn.Identity())
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            for name in self._head_layers:
                setattr(self, name, nn.Identity())
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, "")
        return take


@register_notrace_module
class _Conv2dFoldGrad(nn.Conv2d):
    """nn.Conv2d (stride 1, no padding) whose image gradient on a CPU is one matrix product and ``F.fold``.

    Behind a spatial transformer the first convolution needs the gradient of its input (it flows on to the warp
    parameters). For a few input channels and a large kernel (the paper's 9 x 9 on 1 channel) PyTorch's CPU
    backward computes it at a few GFLOP/s; written as im2col's transpose, W^T @ dY per image and then ``F.fold``
    to sum the columns back into the image, it is about three times faster (148 against 48 ms for a batch of 128
    42 x 42 digits on one core, a third of an ST-CNN training step). The weight and bias gradients stay PyTorch's.
    The product grows with the input channels and PyTorch's backward barely does: measured on one core for a batch
    of 128 42 x 42 images and 32 9 x 9 filters, fold against PyTorch's backward is 67 / 171 ms on 1 channel, 100 / 121
    on 2, 185 / 124 on 3 and 252 / 121 on 4 (the addition's two 2-channel crops stacked), so inputs of more than
    ``FOLD_MAX_CHANNELS`` channels keep PyTorch's. Used only while training on CPU tensors that need the gradient;
    the parameters are those of nn.Conv2d. timm's FX tools keep it as one module (a leaf); traced through by another
    FX tracer, it is nn.Conv2d.
    """

    FOLD_MAX_CHANNELS = 2

    def forward(self, x: Tensor) -> Tensor:
        fold = self.in_channels <= self.FOLD_MAX_CHANNELS and self.training and not _is_traced(x)
        if fold and x.requires_grad and not x.is_cuda and torch.is_grad_enabled():
            return _ConvFoldGrad.apply(x, self.weight, self.bias)
        return super().forward(x)


class _ConvFoldGrad(torch.autograd.Function):
    # F.conv2d(x, weight, bias) with stride 1, no padding; the image gradient by fold (see _Conv2dFoldGrad).

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad = grad.contiguous()
        gx = gw = gb = None
        if need_w or need_b:
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            mask = [False, need_w, need_b and ctx.has_bias]
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask
            )
        if need_x:
            b, out_chans = grad.shape[:2]
            # (B, C k k, Ho Wo) in one batched product; a plain matmul would fold the batch into the rows and copy
            # the transposed result.
            columns = torch.bmm(weight.reshape(out_chans, -1).t().expand(b, -1, -1), grad.reshape(b, out_chans, -1))
            gx = F.fold(columns, tuple(x.shape[-2:]), tuple(weight.shape[-2:])).to(x.dtype)
        return gx, gw, gb


class _ExportableAdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    """Adaptive max-pooling to pool x pool that ONNX export can translate.

    The ONNX exporter has no translation of ``aten.adaptive_max_pool2d`` (torch 2.11 to 2.14), so under export the
    pooling is written out: each output cell's window ``[floor(i n / p), ceil((i + 1) n / p))`` (PyTorch's
    adaptive windows) as a max over rows, then over columns, with the sizes fixed by the exported shapes. Eager
    mode keeps PyTorch's kernel, about 3x faster with its backward on the ST-CNN's 11 x 11 maps (2-core CPU).
    """

    def __init__(self, pool: int) -> None:
        super().__init__(pool)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_exporting():
            return super().forward(x)
        (h, w), p = x.shape[-2:], self.pool
        if h % p == 0 and w % p == 0:
            return F.max_pool2d(x, (h // p, w // p))
        rows = torch.stack([x[..., a:b, :].amax(-2) for a, b in _adaptive_windows(h, p)], -2)
        return torch.stack([rows[..., a:b].amax(-1) for a, b in _adaptive_windows(w, p)], -1)


def _adaptive_windows(n: int, p: int) -> list[tuple[int, int]]:
    """The p windows [start, end) that adaptive pooling of n cells to p uses."""
    return [((i * n) // p, -(-(i + 1) * n // p)) for i in range(p)]


class PaperCNN(_ConvNet):
    """The paper's CNN: two convolutions with max-pooling, then one fully connected classifier.

    conv(k1 x k1, c1) -> ReLU -> max-pool 2 -> conv(k2 x k2, c2) -> ReLU -> adaptive max-pool (pool x pool)
    -> flatten -> [dropout] -> fully connected (num_classes). Parameters:
    ``c1 (in_chans k1^2 + 1) + c2 (c1 k2^2 + 1) + num_classes (c2 pool^2 + 1)``, whatever the input size.
    ``forward_features`` returns the pooled map (B, c2, pool, pool): ``num_features`` is its channels, c2, and
    ``head_hidden_size`` the width of the flattened map that the classifier reads, c2 * pool^2.

    ``feature_info`` has three levels: the first convolution's map after its ReLU (``act1``: c1 channels, reduction
    1, these convolutions are unpadded), the second's (``act2``: c2, reduction 2) and the pooled grid (``pool2``:
    c2). The grid is pool x pool for any input, so its reduction is nominal: the default 28-pixel input over the
    grid (7 for a 4 x 4 grid), at least 2.

    Args:
        num_classes: outputs of the classifier; 0 for none (``forward`` then returns the flat features).
        in_chans: input channels.
        channels: filters of the two convolutions (c1, c2).
        kernel_sizes: sides of the two convolution kernels (k1, k2).
        pool: side of the grid that the second max-pooling pools to.
        drop_rate: dropout before the classifier.
        global_pool: "flatten", or "" with num_classes 0 for the unflattened map (see ``reset_classifier``).
    """

    _levels = (("conv1", "act1"), ("pool1", "conv2", "act2"), ("pool2",))

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        channels: Sequence[int] = (32, 32),
        kernel_sizes: Sequence[int] = (9, 7),
        pool: int = 4,
        drop_rate: float = 0.0,
        global_pool: str = "flatten",
    ) -> None:
        super().__init__()
        _check_classes(num_classes, in_chans)
        if len(channels) != 2 or len(kernel_sizes) != 2 or min(*channels, *kernel_sizes, pool) < 1:
            raise ValueError(
                f"expected two positive channels, two kernel sizes and pool >= 1, got "
                f"{channels}, {kernel_sizes}, {pool}"
            )
        (c1, c2), (k1, k2) = channels, kernel_sizes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = c2
        self.head_hidden_size = c2 * pool * pool
        # The second convolution needs k2 pixels after the first pooling: (H - k1 + 1) // 2 >= k2.
        self.min_size = k1 - 1 + 2 * k2
        # In the order of the forward (timm's module-list feature extractors rely on it); the ReLUs have no
        # parameters, so the state dict is conv1, conv2, head.
        self.conv1 = _Conv2dFoldGrad(in_chans, c1, k1)
        self.act1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, k2)
        self.act2 = nn.ReLU()
        self.pool2 = _ExportableAdaptiveMaxPool2d(pool)
        self.feature_info = [
            {"num_chs": c1, "reduction": 1, "module": "act1"},
            {"num_chs": c2, "reduction": 2, "module": "act2"},
            {"num_chs": c2, "reduction": max(2, _DEFAULT_SIZE // pool), "module": "pool2"},
        ]
        self._make_head(num_classes, global_pool)


class PaperFCN(_PaperNet):
    """The paper's fully connected network: hidden fully connected layers with ReLU, then the classifier.

    adaptive average pool of the image to grid x grid -> flatten -> [fc(h_i) -> ReLU] for each hidden width ->
    [dropout] -> fully connected (num_classes). Parameters: ``sum_i h_i (h_{i-1} + 1) + num_classes (h_n + 1)``
    with ``h_0 = in_chans grid^2``, whatever the input size. ``forward_features`` returns the last hidden layer
    (B, h_n): ``num_features`` and ``head_hidden_size`` are both h_n. There is no spatial feature map, so no
    ``feature_info`` and no ``features_only``.

    Args:
        num_classes: outputs of the classifier; 0 for none.
        in_chans: input channels.
        hidden: widths of the hidden layers.
        grid: side of the grid the image is area-resampled to first (28 keeps 28x28 digits unchanged).
        drop_rate: dropout before the classifier.
        global_pool: "flatten", or "" with num_classes 0 (the features are flat already: the same output).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        hidden: Sequence[int] = (128, 128),
        grid: int = 28,
        drop_rate: float = 0.0,
        global_pool: str = "flatten",
    ) -> None:
        super().__init__()
        _check_classes(num_classes, in_chans)
        if len(hidden) < 1 or min(*hidden, grid) < 1:
            raise ValueError(f"expected at least one positive hidden width and grid >= 1, got {hidden}, {grid}")
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.min_size = 1
        self.grid = nn.AdaptiveAvgPool2d(grid)
        layers: list[nn.Module] = []
        width = in_chans * grid * grid
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.fc = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = width
        self._make_head(num_classes, global_pool)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last hidden layer (B, num_features) of images (B, in_chans, H, W)."""
        self._check_input(x)
        return self.fc(self.grid(x).flatten(1))


class SequenceCNN(_ConvNet):
    """A house-number reader in the spirit of the paper's SVHN network (Goodfellow et al. 2013), sized for a CPU.

    Four convolutional blocks ``conv1`` .. ``conv4``, each conv -> BatchNorm -> ReLU -> max-pool 2 (the paper's
    ST-CNN Multi puts a spatial transformer before each of them: ``InnerTransformers(at=["conv1", ..., "conv4"])``),
    then adaptive max-pooling to ``pool`` (rows, columns), a fully connected layer ``fc`` of ``hidden`` units with
    ReLU and the classifier. The paper's network has eight convolutional layers of 48 to 192 filters and two fully
    connected layers of 3,072 units; this one keeps its shape (convolutions, then fully connected layers reading
    where the features are) at a size that trains on two CPU cores in minutes. ``forward_features`` returns the
    pooled map (B, channels[-1], rows, columns), so ``num_features`` is channels[-1]; the fully connected layer
    belongs to the head, and ``head_hidden_size`` is ``hidden``, the width that the sequence heads
    (``tasks.SequenceReading``) read.

    ``feature_info`` has the four blocks' maps (reductions 2, 4, 8 and 16). The pooled grid is not a level of its
    own: on square inputs the pooling to (2, 6) repeats columns, so it has no stride.

    Args:
        num_classes: outputs of the classifier; 0 for none.
        in_chans: input channels.
        channels: filters of the four blocks.
        hidden: units of the fully connected layer.
        pool: (rows, columns) of the grid the last map is max-pooled to.
        drop_rate: dropout before the classifier.
        global_pool: "flatten", or "" with num_classes 0 for the unflattened map (the fully connected layer is then
            skipped, see ``reset_classifier``).
    """

    _levels = (("conv1",), ("conv2",), ("conv3",), ("conv4",))
    _tail = ("pool",)
    _head_layers = ("fc",)

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        channels: Sequence[int] = (32, 48, 64, 96),
        hidden: int = 256,
        pool: Sequence[int] = (2, 6),
        drop_rate: float = 0.0,
        global_pool: str = "flatten",
    ) -> None:
        super().__init__()
        _check_classes(num_classes, in_chans)
        if len(channels) != 4 or len(pool) != 2 or min(*channels, *pool, hidden) < 1:
            raise ValueError(
                f"expected four positive channels, pool (rows, columns) and hidden >= 1, got "
                f"{channels}, {pool}, {hidden}"
            )
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.min_size = 16  # four poolings of 2 leave a 1 x 1 map
        widths = [in_chans, *channels]
        for i in range(4):
            kernel = 5 if i == 0 else 3
            block = nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(widths[i + 1]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )
            self.add_module(f"conv{i + 1}", block)  # conv1 .. conv4: the places ST-CNN Multi inserts before
        self.conv1: nn.Module
        self.conv2: nn.Module
        self.conv3: nn.Module
        self.conv4: nn.Module
        self.pool = nn.AdaptiveMaxPool2d((pool[0], pool[1]))
        self.fc = nn.Sequential(nn.Linear(channels[-1] * pool[0] * pool[1], hidden), nn.ReLU(inplace=True))
        self.num_features = channels[-1]
        self.head_hidden_size = hidden
        self.feature_info = [
            {"num_chs": c, "reduction": 2 ** (i + 1), "module": f"conv{i + 1}"} for i, c in enumerate(channels)
        ]
        self._make_head(num_classes, global_pool)

    def _pre_logits(self, x: Tensor) -> Tensor:
        """The fully connected layer's features (B, hidden) of the pooled map."""
        return self.fc(x.flatten(1))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No weights are published for these networks: the cfg describes their input, pooled map and layer names, all
    # the fields that timm's data, weight-loading and feature tools read.
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, _DEFAULT_SIZE, _DEFAULT_SIZE),
        "min_input_size": (1, 22, 22),
        "fixed_input_size": False,
        "pool_size": (4, 4),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": _MNIST_MEAN,
        "std": _MNIST_STD,
        "first_conv": "conv1",
        "classifier": "head",
        "paper_ids": "arXiv:1506.02025",
        "paper_name": "Spatial Transformer Networks",
        "license": "mit",
        **kwargs,
    }


# The FCNs' first layer is fully connected: timm cannot adapt its weights to other input channels (it drops them
# with a warning when it loads weights of another channel count) and their map has no spatial size (pool_size None).
_FCN_CFG = {"first_conv": "fc.0", "pool_size": None, "min_input_size": (1, 1, 1)}

default_cfgs = generate_default_cfgs(
    {
        "stn_paper_cnn": _cfg(),
        "stn_paper_cnn_st": _cfg(),
        "stn_paper_fcn": _cfg(**_FCN_CFG),
        "stn_paper_fcn_st": _cfg(**_FCN_CFG),
        "stn_sequence_cnn": _cfg(
            first_conv="conv1.0", input_size=(1, 64, 64), min_input_size=(1, 16, 16), pool_size=(2, 6)
        ),
    }
)


def _create(cls: type[_PaperNet], variant: str, pretrained: bool, **kwargs: Any) -> _PaperNet:
    if issubclass(cls, _ConvNet):
        # features_only=True: timm's FeatureGetterNet around forward_intermediates, every level by default.
        levels = tuple(range(len(cls._levels)))
        feature_cfg = {"out_indices": levels, "feature_cls": "getter"}
        return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
    if kwargs.get("features_only"):
        raise ValueError(
            f"{variant} is a fully connected network: it has no spatial feature maps for features_only=True to "
            "return; its features are forward_features' last hidden layer (B, num_features)"
        )
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


@register_model
def stn_paper_cnn(pretrained: bool = False, **kwargs: Any) -> _PaperNet:
    """The paper's CNN baseline: conv 9x9 32 -> max-pool -> conv 7x7 32 -> max-pool to 4x4 -> fc (57,962)."""
    return _create(PaperCNN, "stn_paper_cnn", pretrained, **{"channels": (32, 32), **kwargs})


@register_model
def stn_paper_cnn_st(pretrained: bool = False, **kwargs: Any) -> _PaperNet:
    """The CNN behind a transformer in the ST-CNN: 23 filters per convolution (31,520 + the localiser)."""
    return _create(PaperCNN, "stn_paper_cnn_st", pretrained, **{"channels": (23, 23), **kwargs})


@register_model
def stn_paper_fcn(pretrained: bool = False, **kwargs: Any) -> _PaperNet:
    """The paper's FCN baseline: 28x28 grid -> fc 128 -> fc 128 -> fc (118,282)."""
    return _create(PaperFCN, "stn_paper_fcn", pretrained, **{"hidden": (128, 128), **kwargs})


@register_model
def stn_paper_fcn_st(pretrained: bool = False, **kwargs: Any) -> _PaperNet:
    """The FCN behind a transformer in the ST-FCN: two hidden layers of 102 units (91,606 + the localiser)."""
    return _create(PaperFCN, "stn_paper_fcn_st", pretrained, **{"hidden": (102, 102), **kwargs})


@register_model
def stn_sequence_cnn(pretrained: bool = False, **kwargs: Any) -> _PaperNet:
    """A small house-number reader: four conv blocks (32, 48, 64, 96) -> max-pool to 2 x 6 -> fc 256 -> fc."""
    return _create(SequenceCNN, "stn_sequence_cnn", pretrained, **kwargs)
