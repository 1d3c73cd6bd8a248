"""The classifier: K spatial transformers -> a timm backbone -> fusion -> the task's head."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .insertion import InnerTransformers
from .localization import create_timm_model
from .tasks import Classification, Task, log_probability_of_sum
from .transformer import SpatialTransformer

__all__ = ["Fusion", "STNClassifier", "log_probability_of_sum"]

Fusion = Literal["channels", "features", "none"]
_FUSIONS = ("channels", "features", "none")


class STNClassifier(nn.Module):
    """K spatial transformers in front of any timm backbone, and a task's head behind it.

    Fusion modes:

    * ``"channels"``: the K crops are stacked as K*C input channels of one backbone pass (the paper's MNIST
      addition, where each transformer picks one digit);
    * ``"features"``: one shared backbone runs over the B*K crops; their pooled features are concatenated (the
      paper's CUB part networks), or, for a task that reads each object on its own (``task.per_object``, e.g.
      :class:`~stn_lightning.tasks.SumOfObjects` or :class:`~stn_lightning.tasks.SetOfObjects`), handed to its head
      one crop at a time;
    * ``"none"``: no transformer in front; the same backbone sees the whole image (the baseline of every
      experiment, and the place for transformers inside the backbone, ``inner``). Tasks that read one object per
      crop need a transformer, except those that can read objects from the whole image's features (their
      ``per_object`` is False there: ``SetOfObjects(slots=K)``, K slot heads).

    With ``object_channels``, each of the input's C channels holds one object (MNIST addition: one digit per
    channel) and the task reads one object per crop. With fusion ``"features"`` (and K = C transformers), every
    transformer's localiser sees all channels but crop k keeps only channel k, so transformer k looks for the
    object of channel k and the shared backbone classifies C one-channel crops. With fusion ``"none"`` the backbone
    reads each whole channel as one object: the baseline with the same prior.

    Args:
        backbone: any timm model name.
        num_classes: the data's classes (what they mean is the task's).
        in_chans: channels of the input images.
        transformer: the SpatialTransformer in front (required unless fusion is "none").
        fusion: "channels", "features" or "none".
        task: what the network answers (head, loss, metrics); default :class:`~stn_lightning.tasks.Classification`.
        pretrained: True for timm's published weights, a path of local backbone weights, or None.
        backbone_kwargs: extra arguments for ``timm.create_model`` (drop_rate, ...). ``{"global_pool": ""}``
            keeps the feature map unpooled: the head then sees where features are (flattened), like the
            fully connected classifier of the paper's CNN baselines.
        input_size: (H, W) of the images; with it the head's width is measured by one forward pass, which
            unpooled feature maps need (and ``inner`` needs it to find its places' maps).
        object_channels: one object per input channel (see above); needs a per-object task.
        inner: spatial transformers inside the backbone (:class:`~stn_lightning.insertion.InnerTransformers`),
            inserted after the backbone is built (and its pretrained weights loaded); needs ``input_size``.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        in_chans: int,
        transformer: SpatialTransformer | None = None,
        fusion: Fusion = "channels",
        task: Task | None = None,
        pretrained: bool | str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        input_size: tuple[int, int] | None = None,
        object_channels: bool = False,
        inner: InnerTransformers | None = None,
    ) -> None:
        super().__init__()
        if fusion not in _FUSIONS:
            raise ValueError(f"expected fusion in {_FUSIONS}, got {fusion!r}")
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"expected num_classes >= 1 and in_chans >= 1, got {num_classes} and {in_chans}")
        if fusion != "none" and transformer is None:
            raise ValueError(f"fusion {fusion!r} needs a transformer; use fusion='none' for the plain backbone")
        task = task if task is not None else Classification()
        self.fusion = fusion
        self.in_chans = in_chans
        self.object_channels = object_channels
        self.transformer = transformer if fusion != "none" else None
        k = self.transformer.num_transformers if self.transformer is not None else 1
        if task.per_object and fusion == "channels":
            raise ValueError(f"{type(task).__name__} reads one object per crop: use fusion 'features', not 'channels'")
        if object_channels:
            if not task.per_object:
                raise ValueError(
                    f"object_channels needs a task that reads one object per crop, got {type(task).__name__}"
                )
            if self.transformer is not None and k != in_chans:
                raise ValueError(f"object_channels needs one transformer per channel: K = {k}, in_chans = {in_chans}")
            k = in_chans  # objects per image
        elif task.per_object and self.transformer is None:
            raise ValueError(
                f"{type(task).__name__} reads one object per crop: it needs transformers or object_channels (a task "
                "whose per_object is False reads the whole image, e.g. SetOfObjects(slots=K))"
            )
        backbone_chans = k * in_chans if fusion == "channels" else (1 if object_channels else in_chans)
        net = create_timm_model(
            backbone, pretrained=pretrained, num_classes=0, in_chans=backbone_chans, **(backbone_kwargs or {})
        )
        if inner is not None:
            if input_size is None:
                raise ValueError("inner transformers need the input_size, to find the feature maps they warp")
            size = self.transformer.output_size if self.transformer is not None else input_size
            net = inner(net, input_size=size, in_chans=backbone_chans)
        self.backbone = net
        # The width of forward_head(..., pre_logits=True): timm's head_hidden_size (num_features, the channels of the
        # map, for models without one).
        width = getattr(net, "head_hidden_size", net.num_features)
        if input_size is not None:
            size = self.transformer.output_size if self.transformer is not None else input_size
            was_training = net.training
            net.eval()  # one image: batch statistics would be undefined
            with torch.no_grad():
                width = self.features(torch.zeros(1, backbone_chans, *size)).shape[1]
            net.train(was_training)
        if fusion == "features" and not task.per_object:
            width *= k  # the K crops' features side by side
        task.build(width, num_classes, k)
        self.task = task

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The task's outputs (B, num_outputs) and warp parameters (B, K, P) (None without a transformer in front) of
        images (B, C, H, W)."""
        features, params = self.features_of(x)
        outputs = self.task(features)
        if self.task.uses_regions and not self.training and params is not None and self.transformer is not None:
            outputs = self.task.postprocess(outputs, self.transformer.outline(params, (x.shape[-2], x.shape[-1])))
        return outputs, params

    def features_of(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """What the task's head reads, (B, F) or (B, K, F) per object, and the warp parameters (B, K, P) or None."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if self.transformer is None:
            if self.object_channels:  # each channel is one object: (B * C, 1, H, W)
                return self.features(x.flatten(0, 1)[:, None]).unflatten(0, x.shape[:2]), None
            return self.features(x), None
        crops, params = self.transformer(x)
        if self.fusion == "channels":
            return self.features(crops.flatten(1, 2)), params
        if self.object_channels:  # (B, K, C, h, w) -> channel k of crop k, (B, K, 1, h, w)
            crops = crops.diagonal(dim1=1, dim2=2).movedim(-1, 1)[:, :, None]
        feats = self.features(crops.flatten(0, 1)).unflatten(0, crops.shape[:2])  # (B, K, F)
        return (feats if self.task.per_object else feats.flatten(1)), params

    def features(self, x: Tensor) -> Tensor:
        """Backbone features (N, F) of a batch (N, C', H, W): pooled, or the flattened map without pooling."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True).flatten(1)
