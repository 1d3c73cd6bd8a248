"""What the network answers: a task is its head, its loss, its metrics and how a prediction reads, as one object.

``STNModule(task=...)`` takes one; the classifier (``STNClassifier``) computes features and hands them to the task's
head, the module calls the task's loss and metrics. A new kind of label is a new task, not new module flags.

* :class:`Classification`: one label per image (the default).
* :class:`SumOfObjects`: the label is the sum of one label per object (MultiMNIST, MNIST addition); the head
  classifies each object's crop and the outputs are the log-probabilities of the sum. With ``nothing=True`` each
  crop may also say that it holds no object, which adds 0 to the sum, so more transformers than objects work.
* :class:`SequenceReading`: a string of up to ``max_length`` digits read left to right (house numbers; Goodfellow
  et al. 2013): a length head and one head per position.

Every task's outputs are one tensor (B, num_outputs), so that export, predictions and the module's logging treat all
tasks alike; :meth:`Task.decode` says what they mean.

Targets are what the DataModules give: an int64 (B,) label for the first two, (B, 1 + max_length) for sequences
(``y[:, 0]`` the length, then the digits, -1 past the end).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

__all__ = [
    "Classification",
    "SequenceAccuracy",
    "SequenceReading",
    "SumOfObjects",
    "Task",
    "decode_sequence",
    "log_probability_of_sum",
    "split_sequence_outputs",
]


class Task(nn.Module):
    """Head, loss, metrics and reading of the outputs for one kind of label.

    The classifier calls :meth:`build` once it knows the width of its features, then :meth:`forward` on them:
    (B, F) fused features, or (B, K, F) one row per object when :attr:`per_object` is True.

    Attributes:
        per_object: the head reads each object's (crop's) features on its own instead of the fused image features.
    """

    per_object: bool = False

    def build(self, in_features: int, num_classes: int, num_objects: int) -> None:
        """Create the head.

        Args:
            in_features: width F of the features the head reads.
            num_classes: the data's number of classes (its meaning is the task's: labels, sums or digits).
            num_objects: K, the crops (objects) per image; 1 without transformers.
        """
        raise NotImplementedError

    def loss(self, outputs: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """The mean loss of outputs (B, num_outputs) against the data's targets."""
        raise NotImplementedError

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        """Fresh metrics, each updated with ``(outputs, target)``; ``"acc"`` is the headline (the CLI's test
        accuracy)."""
        raise NotImplementedError

    def decode(self, outputs: Tensor) -> dict[str, Tensor]:
        """What outputs (B, num_outputs) say, as tensors with a leading B: ``"prediction"`` always."""
        raise NotImplementedError

    def format(self, label: Tensor, names: Sequence[str] | None = None) -> str:
        """A label (or prediction) of one image as text, with the data's class names where it has them."""
        index = int(label)
        return names[index] if names is not None and 0 <= index < len(names) else str(index)

    def config(self) -> dict[str, Any]:
        """The task as plain data, ``{"class_path": ..., "init_args": {...}}`` (LightningCLI's form): what checkpoints
        keep so that ``STNModule.load_from_checkpoint`` rebuilds it. Every argument of ``__init__`` must be stored
        under its own name."""
        parameters = inspect.signature(type(self).__init__).parameters.values()
        plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names = [p.name for p in parameters if p.name != "self" and p.kind in plain]
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {n: getattr(self, n) for n in names}}

    @staticmethod
    def from_config(config: dict[str, Any]) -> Task:
        """The task that :meth:`config` describes (a subclass of Task, or ValueError)."""
        module_name, _, name = str(config.get("class_path", "")).rpartition(".")
        cls = getattr(importlib.import_module(module_name), name, None) if module_name else None
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"expected the class path of a Task, got {config.get('class_path')!r}")
        return cls(**dict(config.get("init_args") or {}))


class Classification(Task):
    """One label per image: a linear layer, cross-entropy, accuracy (and top-5 accuracy from 10 classes on)."""

    def build(self, in_features: int, num_classes: int, num_objects: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """Logits (B, num_classes) of features (B, F)."""
        return self.head(features)

    def loss(self, outputs: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        return F.cross_entropy(outputs, target, label_smoothing=label_smoothing)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        found: dict[str, torchmetrics.Metric] = {
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes)
        }
        if self.num_classes >= 10:
            found["acc_top5"] = torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes, top_k=5)
        return found

    def decode(self, outputs: Tensor) -> dict[str, Tensor]:
        """``"probs"`` (B, num_classes) and the ``"prediction"`` (B,)."""
        probs = outputs.float().softmax(-1)
        return {"probs": probs, "prediction": probs.argmax(-1)}


class SumOfObjects(Classification):
    """Labels that are the sum of one label per object, each object in its own crop.

    One head classifies each of the K crops into ``c`` object classes (values 0 .. c - 1), and the outputs are
    log P(s) for the sums s = 0 .. num_classes - 1 of K independent crop labels (:func:`log_probability_of_sum`). A
    crop scores only if it shows an object, and two crops on one object predict twice its label, so the loss rewards
    K transformers on K different objects. ``c`` is ``object_classes``, or from the data when K objects fill it,
    num_classes = K (c - 1) + 1.

    With ``nothing=True`` the head has one more class, "nothing here", which adds 0 to the sum: a transformer with no
    object of its own can say so instead of inventing one, so K transformers work on scenes of fewer than K objects.
    Sums the data cannot hold (above num_classes - 1) are left out; the outputs stay log-probabilities over the sums
    the data can hold, renormalised.

    Args:
        object_classes: classes per object (10 for digits); None derives it from num_classes and K.
        nothing: add the "nothing here" class.
    """

    per_object = True

    def __init__(self, object_classes: int | None = None, nothing: bool = False) -> None:
        super().__init__()
        if object_classes is not None and object_classes < 2:
            raise ValueError(f"expected object_classes >= 2 or None, got {object_classes}")
        self.object_classes = object_classes
        self.nothing = nothing

    def build(self, in_features: int, num_classes: int, num_objects: int) -> None:
        c = self.object_classes
        if c is None:
            c, remainder = divmod(num_classes - 1, num_objects)
            c += 1
            if remainder or c < 2:
                raise ValueError(
                    f"SumOfObjects needs num_classes = K (c - 1) + 1 for c classes per object, or object_classes; "
                    f"got num_classes {num_classes} with K = {num_objects}"
                )
        if num_classes > num_objects * (c - 1) + 1:
            raise ValueError(
                f"SumOfObjects: {num_objects} objects of {c} classes sum to at most {num_objects * (c - 1)}, "
                f"but the data has {num_classes} classes; give more transformers"
            )
        self.num_classes = num_classes
        self.head = nn.Linear(in_features, c + int(self.nothing))

    def forward(self, features: Tensor) -> Tensor:
        """Log-probabilities (B, num_classes) of the sum, from per-object features (B, K, F)."""
        logits = self.head(features)
        if self.nothing:  # "nothing" adds 0, like class 0: merge the two before summing
            log_p = torch.log_softmax(logits.float(), dim=-1)
            zero = torch.logaddexp(log_p[..., :1], log_p[..., -1:])
            logits = torch.cat([zero, log_p[..., 1:-1]], dim=-1)
        total = log_probability_of_sum(logits)[:, : self.num_classes]
        return torch.log_softmax(total, dim=-1)

    def decode_objects(self, features: Tensor) -> Tensor:
        """Each crop's own probabilities (B, K, c [+ 1 for "nothing", last]) from per-object features (B, K, F)."""
        return self.head(features).float().softmax(-1)


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


class SequenceReading(Task):
    """A string of 1 to ``max_length`` symbols read left to right (Goodfellow et al. 2013, the paper's SVHN task).

    The head is one linear layer giving a length distribution over 0 .. max_length and, for every position, a
    distribution over the ``num_classes`` symbols; outputs (B, (max_length + 1) + max_length * num_classes) are those
    logits side by side (:meth:`split` separates them). The loss is the negative log-likelihood of the whole
    sequence, log P(L) + sum over i < L of log P(s_i), averaged over images. Decoding takes the most probable
    sequence: for every length L the best symbol at each position below L, then the L of the highest total.

    Targets: int64 (B, 1 + max_length), ``y[:, 0]`` the length, ``y[:, 1 + i]`` the i-th symbol, -1 past the end.

    Args:
        max_length: the longest sequence.
    """

    def __init__(self, max_length: int = 5) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"expected max_length >= 1, got {max_length}")
        self.max_length = max_length

    def build(self, in_features: int, num_classes: int, num_objects: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(in_features, self.max_length + 1 + self.max_length * num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """Logits (B, (max_length + 1) + max_length * num_classes) of features (B, F)."""
        return self.head(features)

    def split(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Length logits (B, max_length + 1) and symbol logits (B, max_length, num_classes)."""
        return split_sequence_outputs(outputs, self.max_length, self.num_classes)

    def _check(self, target: Tensor) -> None:
        if target.dim() != 2 or target.shape[1] != 1 + self.max_length:
            raise ValueError(
                f"SequenceReading(max_length={self.max_length}) expected targets (B, {1 + self.max_length}), "
                f"got {tuple(target.shape)}; the data's max_length must be the task's"
            )

    def loss(self, outputs: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        self._check(target)
        length_logits, symbol_logits = self.split(outputs.float())
        loss = F.cross_entropy(length_logits, target[:, 0], label_smoothing=label_smoothing)
        symbols = F.cross_entropy(
            symbol_logits.flatten(0, 1),
            target[:, 1:].flatten(),
            ignore_index=-1,
            reduction="sum",
            label_smoothing=label_smoothing,
        )
        return loss + symbols / len(target)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        size = (self.max_length, self.num_classes)
        found: dict[str, torchmetrics.Metric] = {"acc": SequenceAccuracy(*size, "sequence")}
        found["acc_length"] = SequenceAccuracy(*size, "length")
        for i in range(self.max_length):
            found[f"acc_digit{i + 1}"] = SequenceAccuracy(*size, i)
        return found

    def decode(self, outputs: Tensor) -> dict[str, Tensor]:
        """``"prediction"`` (B, 1 + max_length) in the targets' layout, ``"length"`` (B,), ``"symbols"``
        (B, max_length) (-1 past the length) and ``"probs"`` (B,), the sequence's probability."""
        return decode_sequence(outputs, self.max_length, self.num_classes)

    def format(self, label: Tensor, names: Sequence[str] | None = None) -> str:
        symbols = [super(SequenceReading, self).format(s, names) for s in label[1 : 1 + int(label[0])]]
        return "".join(symbols) if symbols else "-"


class SequenceAccuracy(torchmetrics.Metric):
    """Accuracy of :class:`SequenceReading`: the whole sequence (length and every symbol), the length, or one
    position (the symbol there, over images whose true sequence reaches it).

    Args:
        max_length, num_classes: the task's.
        what: "sequence", "length" or a position 0 .. max_length - 1.
    """

    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, max_length: int, num_classes: int, what: str | int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = (max_length, num_classes)
        self.what = what
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Tensor, target: Tensor) -> None:
        pred = decode_sequence(outputs.detach(), *self.size)["prediction"]
        if self.what == "sequence":
            right, count = (pred == target).all(1), torch.ones_like(target[:, 0], dtype=torch.bool)
        elif self.what == "length":
            right, count = pred[:, 0] == target[:, 0], torch.ones_like(target[:, 0], dtype=torch.bool)
        else:
            i = 1 + int(self.what)
            count = target[:, i] >= 0
            right = (pred[:, i] == target[:, i]) & count
        self.correct += right.sum()
        self.total += count.sum()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


def split_sequence_outputs(outputs: Tensor, max_length: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """Length logits (B, max_length + 1) and symbol logits (B, max_length, num_classes) of :class:`SequenceReading`'s
    outputs (B, (max_length + 1) + max_length * num_classes)."""
    n = max_length + 1
    return outputs[:, :n], outputs[:, n:].unflatten(1, (max_length, num_classes))


def decode_sequence(outputs: Tensor, max_length: int, num_classes: int) -> dict[str, Tensor]:
    """The most probable sequence of :class:`SequenceReading`'s outputs (see :meth:`SequenceReading.decode`)."""
    length_logits, symbol_logits = split_sequence_outputs(outputs.float(), max_length, num_classes)
    best, symbols = symbol_logits.log_softmax(-1).max(-1)  # (B, max_length) each
    # score(L) = log P(L) + sum_{i < L} max log P(s_i): cumulative sums of the best symbols, 0 for L = 0
    prefix = torch.cat([best.new_zeros(len(best), 1), best.cumsum(1)], dim=1)
    top, length = (length_logits.log_softmax(-1) + prefix).max(-1)
    positions = torch.arange(max_length, device=outputs.device)
    symbols = symbols.masked_fill(positions >= length[:, None], -1)
    return {
        "prediction": torch.cat([length[:, None], symbols], dim=1),
        "length": length,
        "symbols": symbols,
        "probs": top.exp(),
    }
