"""Helpers of the localisation training recipe: a warm-up of the localisation rate, penalties on the warp and an
optimiser of its own for the localisation net.

The localisation head's first updates can throw the warp out of the image, where the sampler reads only padding
and gives it no gradient back. ``STNModule`` exposes these pieces as options (``loc_warmup_steps``,
``boundary_weight``, ``identity_weight``, ``penalty_decay_steps``, ``loc_optimizer``); benchmarks/RESULTS-training.md
("Localisation recipe") says what each was measured to do. What helped on cluttered digits was the zoomed-in start
(``init_scale``), standardised features with a clipped localisation gradient, and Adam for the localiser: these are
STNModule's defaults (``init_scale=None``, ``feature_norm=True``, ``loc_grad_clip=1.0``,
``loc_optimizer=torch.optim.Adam``). The warm-up and the penalties did not help, and are off by default.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .transforms import Transform

__all__ = ["GroupedOptimizer", "boundary_penalty", "decay_factor", "identity_penalty", "warmup_factor"]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then 1.

    Step 0 already takes a small step (1 / warmup_steps of the rate), so the warp starts moving at once.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def decay_factor(step: int, decay_steps: int | None) -> float:
    """Weight of a decaying penalty: 1 at step 0, cosine down to 0 at ``decay_steps``; None keeps it at 1."""
    if decay_steps is None:
        return 1.0
    if step >= decay_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))


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


def identity_penalty(params: Tensor, target: Tensor) -> Tensor:
    """Squared distance (B, K, P) -> scalar between warp parameters and their start ``target`` (K, P) or (P,),
    summed over parameters and averaged over images and transformers."""
    return (params.float() - target.to(params.device, torch.float32)).square().sum(-1).mean()


class GroupedOptimizer(torch.optim.Optimizer):
    """Several optimisers stepped as one, e.g. SGD for the classifier and Adam for the localisation net.

    Lightning's automatic optimisation and the LR schedulers see one optimiser: ``param_groups`` lists the groups of
    all parts in order (the same dicts, so a scheduler's rates reach each part), ``step`` runs the closure once and
    then steps every part, and the state dict holds each part's.

    Args:
        optimizers: the parts, each over its own parameters.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("expected at least one optimizer")
        self.optimizers = list(optimizers)
        self.defaults = {}
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property  # type: ignore[override]
    def state(self) -> dict:
        """The per-parameter state of all parts."""
        merged: dict = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value: dict) -> None:  # Optimizer.__init__ is not called; ignore its assignment
        pass

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for o, s in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(s)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    def __repr__(self) -> str:
        return f"GroupedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"
