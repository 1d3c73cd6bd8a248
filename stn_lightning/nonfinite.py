"""Non-finite training steps, found without a device-to-host copy per step (``STNModule(nonfinite="raise")``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteWatch"]

# The columns of NonFiniteWatch.first.
_STEP, _EPOCH, _BATCH, _PIXELS, _IMAGES, _SIZE, _KIND = range(7)
_PIXEL, _LOSS, _GRAD = 1, 2, 4  # bits of _KIND


class NonFiniteWatch:
    """Flags of NaN or inf pixels, losses and gradients, kept on the device and read when asked.

    Each step records its flags on the device (no ``.item()``, no ``bool(tensor)``): :meth:`clean` for the batch,
    :meth:`watch_loss` for the loss and the warp parameters, :meth:`watch_grads` for the gradients, whose answer (a
    0-dim bool tensor) lets the caller zero the step's gradients on the device. The first flagged step's details
    (step, epoch, batch, pixel counts, loss) are kept until :meth:`read` copies them to the host, once per check.
    """

    def __init__(self) -> None:
        self.first: Tensor | None = None  # (7,) int64, the columns above; step -1 while nothing was flagged
        self.loss: Tensor | None = None  # the first flagged step's loss
        self.warps: Tensor | None = None  # (K,) bool: transformer k's warp parameters were non-finite
        self.grads: Tensor | None = None  # (P,) bool: parameter p's gradient was non-finite
        self.names: list[str] = []  # the parameters' names, in the order of watch_grads' gradients
        self._step: Tensor | None = None  # the current step's row of ``first`` and its kind
        self._loss: Tensor | None = None

    def _start(self, device: torch.device) -> None:
        if self.first is None or self.first.device != device:
            self.first = torch.full((7,), -1, dtype=torch.int64, device=device)
            self.loss = torch.zeros((), device=device)
        self._step = torch.zeros(7, dtype=torch.int64, device=device)
        self._loss = torch.zeros((), device=device)

    def clean(self, x: Tensor, step: int, epoch: int, batch_idx: int) -> Tensor:
        """Record the batch's NaN or inf pixels and return images (B, C, H, W) with them set to 0 (a copy)."""
        self._start(x.device)
        assert self._step is not None
        bad = ~torch.isfinite(x)
        row = self._step
        row[_STEP].fill_(step)
        row[_EPOCH].fill_(epoch)
        row[_BATCH].fill_(batch_idx)
        row[_SIZE].fill_(len(x))
        row[_PIXELS].copy_(bad.sum())
        row[_IMAGES].copy_(bad.flatten(1).any(1).sum())
        row[_KIND].copy_(torch.where(row[_PIXELS] > 0, _PIXEL, 0))
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    def watch_loss(self, loss: Tensor, params: Tensor | None) -> None:
        """Record a non-finite loss and which transformers' warp parameters (B, K, P) were non-finite."""
        assert self._step is not None and self._loss is not None
        bad = ~torch.isfinite(loss.detach())
        self._step[_KIND].bitwise_or_(torch.where(bad, _LOSS, 0))
        self._loss.copy_(loss.detach().float())
        if params is not None:
            warps = ~torch.isfinite(params.detach()).flatten(2).all(-1).all(0)  # (K,)
            self.warps = warps if self.warps is None or self.warps.shape != warps.shape else self.warps | warps

    def watch_grads(self, grads: Sequence[Tensor | None]) -> Tensor:
        """Record non-finite gradients (None for parameters without one) and return the step's flag, a 0-dim bool
        tensor: True when its pixels, loss or gradients were non-finite."""
        assert self._step is not None
        present = [g for g in grads if g is not None]
        if present:
            norms = iter(torch._foreach_norm(present))  # one norm per tensor, in one pass
            finite = torch.stack([torch.isfinite(next(norms)) if g is not None else self._true() for g in grads])
            bad = ~finite
            self.grads = bad if self.grads is None or self.grads.shape != bad.shape else self.grads | bad
            self._step[_KIND].bitwise_or_(torch.where(bad.any(), _GRAD, 0))
        return self._step[_KIND] > 0

    def _true(self) -> Tensor:
        assert self._step is not None
        return torch.ones((), dtype=torch.bool, device=self._step.device)

    def commit(self, flag: Tensor | None = None) -> None:
        """Keep the current step's details if it is the first flagged one; ``flag`` overrides its own (e.g. the flag
        of any DDP rank)."""
        if self._step is None or self.first is None or self.loss is None or self._loss is None:
            return
        flag = self._step[_KIND] > 0 if flag is None else flag
        take = flag & (self.first[_STEP] < 0)
        self.first.copy_(torch.where(take, self._step, self.first))
        self.loss.copy_(torch.where(take, self._loss, self.loss))
        self._step = None

    def read(self) -> tuple[list[int], float, list[int], list[int]] | None:
        """The first flagged step's row (step, epoch, batch, bad pixels, bad images, batch size, kind bits), its loss,
        the transformers with non-finite warps and the parameters with non-finite gradients (by position); None when
        no step was flagged. One device-to-host copy."""
        self.commit()
        if self.first is None or self.loss is None:
            return None
        parts = [self.first.float(), self.loss.reshape(1).float()]
        parts += [t.float() for t in (self.warps, self.grads) if t is not None]
        values = torch.cat(parts).tolist()
        if values[_STEP] < 0:
            return None
        row = [int(v) for v in values[:7]]
        k = 0 if self.warps is None else len(self.warps)
        warps = [i for i, v in enumerate(values[8 : 8 + k]) if v]
        grads = [i for i, v in enumerate(values[8 + k :]) if v]
        return row, values[7], warps, grads

    @staticmethod
    def describe(row: list[int], loss: float) -> str:
        """What the first flagged step saw, e.g. "batch 2: 1 NaN or inf pixels in 1 of 8 images"."""
        _, _, batch, pixels, images, size, kind = row
        if kind & _PIXEL:
            return f"batch {batch}: {pixels} NaN or inf pixels in {images} of {size} images"
        if kind & _LOSS:
            return f"non-finite training loss ({loss})"
        return "non-finite gradient"
