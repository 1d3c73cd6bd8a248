"""The classifier: K spatial transformers -> a timm backbone -> fusion -> a linear head."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .localization import create_timm_model
from .transformer import SpatialTransformer

__all__ = ["Fusion", "STNClassifier", "log_probability_of_sum"]

Fusion = Literal["channels", "features", "sum", "none"]
_FUSIONS = ("channels", "features", "sum", "none")


class STNClassifier(nn.Module):
    """K spatial transformers in front of any timm backbone.

    Fusion modes:

    * ``"channels"``: the K crops are stacked as K*C input channels of one backbone pass (the paper's MNIST
      addition, where each transformer picks one digit);
    * ``"features"``: one shared backbone runs over the B*K crops and their pooled features are concatenated
      (the paper's CUB part networks);
    * ``"sum"``: for labels that are the sum of one label per object (MultiMNIST, MNIST addition): one shared
      backbone and head classify each of the K crops into c = (num_classes - 1) / K + 1 classes, and the logits
      are the log-probabilities of the sum of the K labels, log P(s) = log sum over a_1 + ... + a_K = s of
      prod_k p_k(a_k). A crop scores only if it shows an object, and two crops on the same object predict twice
      its label, so the loss rewards K transformers on K different objects (whether they learn to get there at a
      given budget is measured in docs/RESULTS.md: not yet on MultiMNIST);
    * ``"none"``: no transformer; the same backbone sees the whole image (the baseline of every experiment).

    With ``object_channels``, each of the input's C channels holds one object (MNIST addition: one digit per
    channel) and labels are sums of per-object labels. With fusion ``"sum"`` (and K = C transformers), every
    transformer's localiser sees all channels but crop k keeps only channel k, so transformer k looks for the
    object of channel k and the shared backbone and head classify C one-channel crops. With fusion ``"none"`` the
    backbone classifies each whole channel under the same sum head: the baseline with the same prior.

    Args:
        backbone: any timm model name.
        num_classes: classes of the linear head.
        in_chans: channels of the input images.
        transformer: the SpatialTransformer (required unless fusion is "none").
        fusion: "channels", "features", "sum" or "none".
        pretrained: True for timm's published weights, a path of local backbone weights, or None.
        backbone_kwargs: extra arguments for ``timm.create_model`` (drop_rate, ...). ``{"global_pool": ""}``
            keeps the feature map unpooled: the head then sees where features are (flattened), like the
            fully connected classifier of the paper's CNN baselines.
        input_size: (H, W) of the images; with it the head's width is measured by one forward pass, which
            unpooled feature maps need.
        object_channels: one object per input channel (see above); needs fusion "sum" or "none".
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        in_chans: int,
        transformer: SpatialTransformer | None = None,
        fusion: Fusion = "channels",
        pretrained: bool | str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        input_size: tuple[int, int] | None = None,
        object_channels: bool = False,
    ) -> None:
        super().__init__()
        if fusion not in _FUSIONS:
            raise ValueError(f"expected fusion in {_FUSIONS}, got {fusion!r}")
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"expected num_classes >= 1 and in_chans >= 1, got {num_classes} and {in_chans}")
        if fusion != "none" and transformer is None:
            raise ValueError(f"fusion {fusion!r} needs a transformer; use fusion='none' for the plain backbone")
        self.fusion = fusion
        self.in_chans = in_chans
        self.object_channels = object_channels
        self.transformer = transformer if fusion != "none" else None
        k = self.transformer.num_transformers if self.transformer is not None else 1
        if object_channels:
            if fusion not in ("sum", "none"):
                raise ValueError(f"object_channels needs fusion 'sum' or 'none', got {fusion!r}")
            if self.transformer is not None and k != in_chans:
                raise ValueError(f"object_channels needs one transformer per channel: K = {k}, in_chans = {in_chans}")
            k = in_chans  # objects per image
        backbone_chans = k * in_chans if fusion == "channels" else (1 if object_channels else in_chans)
        net = create_timm_model(
            backbone, pretrained=pretrained, num_classes=0, in_chans=backbone_chans, **(backbone_kwargs or {})
        )
        self.backbone = net
        width = net.num_features
        if input_size is not None:
            size = self.transformer.output_size if self.transformer is not None else input_size
            was_training = net.training
            net.eval()  # one image: batch statistics would be undefined
            with torch.no_grad():
                width = self.features(torch.zeros(1, backbone_chans, *size)).shape[1]
            net.train(was_training)
        if fusion == "sum" or object_channels:
            per_crop, remainder = divmod(num_classes - 1, k)
            if remainder or per_crop < 1:
                raise ValueError(
                    f"fusion 'sum' needs num_classes = K (c - 1) + 1 for c classes per object; got num_classes "
                    f"{num_classes} with K = {k}"
                )
            self.head = nn.Linear(width, per_crop + 1)
        else:
            self.head = nn.Linear(width * (k if fusion == "features" else 1), num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits (B, num_classes) and warp parameters (B, K, P) (None without transformer) of images (B, C, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if self.transformer is None:
            if self.object_channels:
                return self._sum_of_objects(x[:, :, None]), None
            return self.head(self.features(x)), None
        crops, params = self.transformer(x)
        b = crops.shape[0]
        if self.fusion == "channels":
            feats = self.features(crops.flatten(1, 2))
        elif self.fusion == "sum":
            if self.object_channels:  # (B, K, C, h, w) -> channel k of crop k, (B, K, 1, h, w)
                crops = crops.diagonal(dim1=1, dim2=2).movedim(-1, 1)[:, :, None]
            return self._sum_of_objects(crops), params
        else:
            feats = self.features(crops.flatten(0, 1)).view(b, -1)
        return self.head(feats), params

    def _sum_of_objects(self, crops: Tensor) -> Tensor:
        """Log-probabilities of the sum of the labels of crops (B, K, C', h, w), one object each."""
        per_crop = self.head(self.features(crops.flatten(0, 1))).view(crops.shape[0], crops.shape[1], -1)
        return log_probability_of_sum(per_crop)

    def features(self, x: Tensor) -> Tensor:
        """Backbone features (N, F) of a batch (N, C', H, W): pooled, or the flattened map without pooling."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True).flatten(1)


def log_probability_of_sum(logits: Tensor) -> Tensor:
    """log P(a_1 + ... + a_K = s) of K independent labels, each with its own logits over 0 .. c - 1.

    Args:
        logits: (B, K, c) unnormalised log-probabilities of each label.

    Returns:
        (B, K (c - 1) + 1) log-probabilities of the sum 0 .. K (c - 1); they are logits whose softmax is
        themselves, so ``cross_entropy`` and ``argmax`` apply as to any logits.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    total = log_p[:, 0]
    for k in range(1, log_p.shape[1]):
        # pairs[b, i, j] = log P(total = i) + log P(a_k = j); the new total i + j collects its anti-diagonal
        pairs = total[:, :, None] + log_p[:, k, None, :]
        n, c = pairs.shape[1], pairs.shape[2]
        sums = torch.arange(n, device=logits.device)[:, None] + torch.arange(c, device=logits.device)
        onto = sums.flatten() == torch.arange(n + c - 1, device=logits.device)[:, None]  # (n + c - 1, n c)
        masked = pairs.flatten(1)[:, None, :].masked_fill(~onto, float("-inf"))
        total = torch.logsumexp(masked, dim=-1)
    return total
