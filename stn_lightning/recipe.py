"""How the localisation nets train: their optimiser, rate and gradient clip, and the loss terms on their warps
(:class:`LocalizationTraining`, ``STNModule(localization=...)``).

The localisation head's first updates can throw the warp out of the image, where the sampler reads only padding
and gives it no gradient back. benchmarks/RESULTS-training.md ("Localisation recipe") says what each piece was
measured to do. What helped on cluttered digits was the zoomed-in start (``TransformerSpec.init_scale``),
standardised features (``TransformerSpec.feature_norm``) with a clipped localisation gradient, and Adam for the
localiser: these are the defaults. A warm-up of the localisation rate and a pull of the warps towards their start
did not help; they live in the study (benchmarks/recipe_study.py), not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .transformer import object_config, object_from_config
from .transforms import Transform

__all__ = ["GroupedOptimizer", "LocalizationTraining", "boundary_penalty"]

OptimizerCallable = Callable[[Iterable[Any]], torch.optim.Optimizer]


@dataclass(frozen=True)
class LocalizationTraining:
    """How the localisation nets and heads (the front transformer's and those inside the backbone) learn.

    In YAML it is one block, ``model.localization: {coverage_weight: 1000.0, overlap_weight: 0.3}``.

    Args:
        optimizer: a callable taking the localisation group and returning its own optimiser, stepped together with
            STNModule's ``optimizer`` for the rest; default Adam at its own default rate (1e-3), whatever trains the
            rest. None: one optimiser for everything, the localisation group at ``lr_scale`` times its rate.
        lr_scale: multiplies the localisation group's learning rate: that of ``optimizer``, or with
            ``optimizer=None`` that of STNModule's optimiser (the paper's setting is then a low scale, e.g. 0.1).
        grad_clip: clip the gradient norm of the localisation nets and heads (only theirs) to this value before each
            step; None leaves it unclipped. The Trainer's ``gradient_clip_val`` still clips every parameter.
        boundary_weight: weight of a training-loss penalty on the region each warp reads leaving the image
            (:func:`boundary_penalty`: 0 while the warp stays inside); 0 turns it off.
        overlap_weight: weight of :func:`~stn_lightning.metrics.overlap_penalty` (the mean IoU of the K transformers'
            regions) added to the training loss, to keep parallel transformers off the same region; 0 adds nothing.
            With K > 1 the penalty is logged as ``<stage>/overlap`` whatever the weight.
        coverage_weight: weight of a training-loss term ``1 - coverage``, where coverage is
            :func:`~stn_lightning.metrics.content_coverage` (the share of the image's content, ``|x - background|``,
            inside the union of the K regions): a localisation signal that does not wait for the classifier, for
            objects on a plain background; pair it with a bounded scale. 0 adds nothing; above 0 the coverage is
            logged as ``<stage>/coverage``.
        coverage_once: count only the content inside exactly one region (``content_coverage(once=True)``): a
            reward for reading each object once, which also pushes a spare transformer off an object that another
            one reads (with the union, nothing does).
    """

    optimizer: OptimizerCallable | None = torch.optim.Adam
    lr_scale: float = 1.0
    grad_clip: float | None = 1.0
    boundary_weight: float = 0.0
    overlap_weight: float = 0.0
    coverage_weight: float = 0.0
    coverage_once: bool = False

    def __post_init__(self) -> None:
        if not self.lr_scale >= 0:
            raise ValueError(f"expected localization lr_scale >= 0, got {self.lr_scale}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"expected localization grad_clip > 0 or None, got {self.grad_clip}")
        weights = (self.boundary_weight, self.overlap_weight, self.coverage_weight)
        if not all(w >= 0 for w in weights):
            raise ValueError(
                f"expected boundary_weight, overlap_weight and coverage_weight >= 0, got {', '.join(map(str, weights))}"
            )

    def config(self) -> dict[str, Any]:
        """As plain data (the optimiser as a class path and arguments; one that is neither a class nor a partial of
        one is left out, and the default takes its place on loading)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        try:
            out["optimizer"] = object_config(self.optimizer)
        except ValueError:
            del out["optimizer"]
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LocalizationTraining:
        """What :meth:`config` describes (also any dict of its fields)."""
        options = dict(config)
        if "optimizer" in options:
            options["optimizer"] = object_from_config(options["optimizer"], call=False)
        return cls(**options)


def _lattice(n: int, device: torch.device) -> Tensor:
    # Pixel centres of an n x n output in normalised coordinates (align_corners=False), (n * n, 2).
    r = (torch.arange(n, device=device, dtype=torch.float32) * 2 + 1) / n - 1
    return torch.stack(torch.meshgrid(r, r, indexing="xy"), -1).reshape(-1, 2)


def boundary_penalty(transform: Transform, params: Tensor, in_size: tuple[int, int], points: int = 8) -> Tensor:
    """How far the region a warp reads leaves the image.

    The pixel centres of a ``points`` x ``points`` output are mapped through the warp; each coordinate beyond
    the input's extent [-1, 1] contributes its squared excess. Zero while every point lies inside (the identity
    and any window within the image); its gradient pulls outside points back towards the edge.

    Args:
        transform: the transformation family.
        params: (B, K, P) warp parameters.
        in_size: input (H, W).
        points: side of the lattice of probed output points.

    Returns:
        A scalar: the excess summed over the two coordinates, averaged over points, transformers and images.
    """
    xy = transform.points(params.float(), _lattice(points, params.device), in_size)  # (B, K, M, 2)
    return (xy.abs() - 1).clamp(min=0).square().sum(-1).mean()


class GroupedOptimizer(torch.optim.Optimizer):
    """Several torch optimisers stepped as one, e.g. SGD for the classifier and Adam for the localisation net.

    It is one ``torch.optim.Optimizer`` over the groups of all parts, in order: the same group dicts (so Lightning's
    automatic optimisation, the LR schedulers and gradient clipping reach every part) and one per-parameter ``state``
    that the parts share, so torch's own ``state_dict`` and ``load_state_dict`` save and restore everything (each group
    keeps its part's options; ``"optimizer"`` names the part). ``step`` runs the closure once, then steps every part.

    Args:
        optimizers: the parts, each over its own parameters.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("expected at least one optimizer")
        self.optimizers = list(optimizers)
        for o in self.optimizers:
            for group in o.param_groups:
                group["optimizer"] = type(o).__name__
        # No defaults: add_param_group keeps each part's group dict as it is (the same object).
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})
        self._share_with_parts()
        # load_state_dict replaces param_groups and state with new objects: hand them to the parts again.
        self.register_load_state_dict_post_hook(lambda optimizer: self._share_with_parts())

    def _share_with_parts(self) -> None:
        start = 0
        for o in self.optimizers:
            count = len(o.param_groups)
            o.param_groups = self.param_groups[start : start + count]
            o.state = self.state
            start += count

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def __repr__(self) -> str:
        return f"GroupedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"
