"""What the network answers: a task is its head, its loss, its metrics and how a prediction reads, as one object.

``STNModule(task=...)`` takes one; the classifier (``STNClassifier``) computes features and hands them to the task's
head, the module calls the task's loss and metrics. A new kind of label is a new task, not new module flags.

* :class:`Classification`: one label per image (the default).
* :class:`SumOfObjects`: the label is the sum of one label per object (MultiMNIST, MNIST addition); the head
  classifies each object's crop and the outputs are the log-probabilities of the sum. With ``nothing=True`` each
  crop may also say that it holds no object, which adds 0 to the sum, so more transformers than objects work.
* :class:`SequenceReading`: a string of up to ``max_length`` digits read left to right (house numbers; Goodfellow
  et al. 2013): a length head and one head per position.
* :class:`SetOfObjects`: the label is the multiset of the objects in the image, any number up to K; each crop is
  read as one object or "nothing", and the loss matches the crops to the objects (as DETR does).

Every task's outputs are one tensor (B, num_outputs), so that export, predictions and the module's logging treat all
tasks alike; :meth:`Task.decode` says what they mean.

Targets are what the DataModules give: an int64 (B,) label for the first two, (B, 1 + max_length) for sequences
(``y[:, 0]`` the length, then the digits, -1 past the end), (B, D) for sets (the objects' classes in any order, -1 for
empty slots).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .metrics import region_iou

__all__ = [
    "Classification",
    "SequenceAccuracy",
    "SequenceReading",
    "SetAccuracy",
    "SetF1",
    "SetOfObjects",
    "SumOfObjects",
    "Task",
    "class_counts",
    "decode_sequence",
    "keep_distinct",
    "log_probability_of_sum",
    "match_objects",
    "split_sequence_outputs",
]


class Task(nn.Module):
    """Head, loss, metrics and reading of the outputs for one kind of label.

    The classifier calls :meth:`build` once it knows the width of its features, then :meth:`forward` on them:
    (B, F) fused features, or (B, K, F) one row per object when :attr:`per_object` is True.

    Attributes:
        per_object: the head reads each object's (crop's) features on its own instead of the fused image features. A
            task may set it per instance (:class:`SetOfObjects` reads crops, or with ``slots`` the whole image).
    """

    per_object: bool = False
    #: The classifier hands :meth:`postprocess` the transformers' regions in eval mode (see there).
    uses_regions: bool = False

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

    def postprocess(self, outputs: Tensor, regions: Tensor) -> Tensor:
        """The outputs once it is known where each crop was read: in eval mode (validation, test, prediction and
        export), for a task whose :attr:`uses_regions` is True, the classifier calls this with the transformers'
        regions (B, K, M, 2) in input pixels. Training sees the head's outputs as they are. The default changes
        nothing."""
        return outputs

    def format(self, label: Tensor, names: Sequence[str] | None = None) -> str:
        """A label (or prediction) of one image as text, with the data's class names where it has them."""
        index = int(label)
        return names[index] if names is not None and 0 <= index < len(names) else str(index)

    def config(self) -> dict[str, Any]:
        """The task as plain data, ``{"class_path": ..., "init_args": {...}}`` (LightningCLI's form): what checkpoints
        keep so that ``STNModule.load_from_checkpoint`` rebuilds it. Every argument of ``__init__`` must be stored
        under its own name."""
        from .transformer import object_config  # the one writer of class paths and arguments

        return object_config(self)

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
    num_classes = K (c - 1) + 1 (not with ``nothing``, which needs ``object_classes``).

    With ``nothing=True`` the head has one more class, "nothing here", which adds 0 to the sum: a transformer with no
    object of its own can say so instead of inventing one, so K transformers work on scenes of fewer than K objects.
    Sums the data cannot hold (above num_classes - 1) are left out; the outputs stay log-probabilities over the sums
    the data can hold, renormalised.

    Args:
        object_classes: classes per object (10 for digits); None derives it from num_classes and K (only without
            ``nothing``).
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
        if c is None and self.nothing:
            # With "nothing" a scene may hold fewer than K objects (that is what it is for), so K objects need not
            # fill the sums: 3 crops on two-digit MultiMNIST (19 sums) would read 7 classes per digit.
            raise ValueError(
                "SumOfObjects(nothing=True) cannot tell the classes per object from the number of sums, since fewer "
                "than K objects may make them; give object_classes (10 for digits)"
            )
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


class SetOfObjects(Task):
    """The multiset of the objects in an image, any number of them up to K: each crop says which object it holds, or
    "nothing".

    One head classifies each of the K crops (``per_object``, fusion "features": K transformers, one crop each) into
    the ``num_classes`` object classes and "nothing", the last class. The loss is DETR's (Carion et al. 2020): the K
    crops are matched one-to-one to the D objects of the image by the assignment of least total cost, the cost of
    crop k for object d being -log p(crop k shows d) (:func:`match_objects`, scipy's ``linear_sum_assignment``), and
    every crop is then scored by cross-entropy against its object, or against "nothing" when it got none. With K > D
    the spare crops learn to say "nothing"; with D > K only K objects are matched and the rest are missed. The
    "nothing" terms weigh ``nothing_weight`` (DETR's ``eos_coef``) and the loss is the weighted mean over the crops.

    With ``slots``, the head reads the image's features instead (fusion "none", no transformer in front: the CNN
    baseline): K = ``slots`` linear "slot" heads on the pooled features, trained with the same matching loss.

    Outputs (B, K (num_classes + 1)) are the K crops' logits side by side; :meth:`decode` reads them. Targets are
    int64 (B, D): the objects' classes in any order, -1 for empty slots. Metrics: ``acc``, the set accuracy (the
    multiset of the crops that do not say "nothing" equals the image's multiset), ``count_acc`` (their number equals
    the number of objects) and ``f1``, the F1 score of the objects found, micro-averaged over every object of every
    image (:class:`SetF1`).

    With ``suppress``, two crops whose windows overlap by more than that intersection over union (of their
    axis-aligned boxes) do not both answer, in eval mode: of the crops that name a digit, the most confident keeps its
    answer and any other whose window overlaps a kept one by more says "nothing" instead (the non-maximum suppression
    of detectors, :func:`keep_distinct`). Classified alone, two crops on one digit both name it; the matching loss
    cannot teach one of them to say "nothing", since each sees the same digit (docs/RESULTS-scenes.md measures it).

    With ``interact``, each crop's answer also reads the other crops (:class:`CropInteraction`): one attention step
    from each crop to the others, and a learnt embedding per transformer. Classified alone, two crops on one object
    see the same digit and cannot tell which of them answers and which says "nothing" (the matching gives one the
    digit and the other "nothing", a contradiction for a head that sees each alone); DETR lets its object queries
    attend to each other for the same reason.

    Args:
        slots: read K = ``slots`` objects from the whole image's features (the baseline without transformers);
            None reads one object per crop.
        nothing_weight: weight of the crops whose answer is "nothing" in the loss (1 weighs them like the others).
        interact: let each crop's answer read the other crops (per crop only, not with ``slots``).
        suppress: the overlap (IoU, in (0, 1]) above which the less confident of two answering crops says "nothing"
            in eval mode; None lets every crop answer (per crop only, not with ``slots``).
    """

    def __init__(
        self,
        slots: int | None = None,
        nothing_weight: float = 1.0,
        interact: bool = False,
        suppress: float | None = None,
    ) -> None:
        super().__init__()
        if suppress is not None:
            if slots is not None:
                raise ValueError(
                    "suppress compares the crops' windows; with slots there are none (give one or the other)"
                )
            if not 0.0 < suppress <= 1.0:
                raise ValueError(f"expected suppress in (0, 1] (an IoU) or None, got {suppress}")
        if slots is not None and slots < 1:
            raise ValueError(f"expected slots >= 1 or None, got {slots}")
        if interact and slots is not None:
            raise ValueError(
                "interact lets crops read each other; with slots there are no crops (give one or the other)"
            )
        if not (nothing_weight >= 0.0 and math.isfinite(nothing_weight)):
            raise ValueError(f"expected a finite nothing_weight >= 0, got {nothing_weight}")
        self.slots = slots
        self.nothing_weight = nothing_weight
        self.interact = interact
        self.suppress = suppress
        self.per_object = slots is None
        self.uses_regions = suppress is not None

    def build(self, in_features: int, num_classes: int, num_objects: int) -> None:
        self.num_classes = num_classes
        self.num_slots = num_objects if self.slots is None else self.slots
        width = num_classes + 1 if self.slots is None else self.slots * (num_classes + 1)
        self.mix = CropInteraction(in_features, self.num_slots) if self.interact else None
        self.head = nn.Linear(in_features * (2 if self.interact else 1), width)

    def forward(self, features: Tensor) -> Tensor:
        """Logits (B, K (num_classes + 1)) of per-crop features (B, K, F), or with ``slots`` of image features
        (B, F)."""
        if self.mix is not None:
            features = self.mix(features)
        return self.head(features).flatten(1)

    def split(self, outputs: Tensor) -> Tensor:
        """The crops' logits (B, K, num_classes + 1) of outputs (B, K (num_classes + 1)); "nothing" is the last
        class."""
        width = self.num_slots * (self.num_classes + 1)
        if outputs.dim() != 2 or outputs.shape[1] != width:
            raise ValueError(f"SetOfObjects expected outputs (B, {width}), got {tuple(outputs.shape)}")
        return outputs.unflatten(1, (self.num_slots, self.num_classes + 1))

    def loss(self, outputs: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        if target.dim() != 2 or target.is_floating_point() or target.is_complex():
            raise ValueError(
                f"SetOfObjects expected integer targets (B, D), the objects' classes and -1 for empty slots, got "
                f"{tuple(target.shape)} {target.dtype}"
            )
        log_p = torch.log_softmax(self.split(outputs).float(), dim=-1)  # (B, K, C + 1)
        answers = match_objects(log_p, target)  # (B, K): matched class, or C for "nothing"
        nothing = answers == self.num_classes
        terms = F.cross_entropy(
            log_p.flatten(0, 1), answers.flatten(), reduction="none", label_smoothing=label_smoothing
        ).view_as(answers)
        weights = torch.where(nothing, self.nothing_weight, 1.0)
        return (terms * weights).sum() / weights.sum().clamp(min=1e-12)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        size = (self.num_slots, self.num_classes)
        return {"acc": SetAccuracy(*size, "set"), "count_acc": SetAccuracy(*size, "count"), "f1": SetF1(*size)}

    def decode(self, outputs: Tensor) -> dict[str, Tensor]:
        """``"prediction"`` (B, K): each crop's class, -1 for "nothing"; ``"probs"`` (B,), the probability of these K
        answers together (the product of the crops' top probabilities); ``"crop_probs"`` (B, K, num_classes + 1)."""
        return decode_set(outputs, self.num_slots, self.num_classes)

    def postprocess(self, outputs: Tensor, regions: Tensor) -> Tensor:
        """With ``suppress``: the crops that :func:`keep_distinct` drops say "nothing" (their "nothing" logit is raised
        to SUPPRESSED_MARGIN above their largest), the others' outputs are unchanged."""
        if self.suppress is None:
            return outputs
        logits = self.split(outputs)
        top, answer = logits.detach().float().softmax(-1).max(-1)  # (B, K)
        answering = answer != self.num_classes
        keep = keep_distinct(region_iou(regions.detach().float()), top.masked_fill(~answering, 0.0), self.suppress)
        dropped = answering & ~keep
        nothing = torch.where(dropped, logits.amax(-1) + SUPPRESSED_MARGIN, logits[..., -1])
        return torch.cat([logits[..., :-1], nothing[..., None]], -1).flatten(1)

    def format(self, label: Tensor, names: Sequence[str] | None = None) -> str:
        """A multiset as text, sorted: "{3, 7}", "{}" for none (labels and predictions alike: -1 is no object)."""
        found = sorted(int(v) for v in label.flatten().tolist() if v >= 0)
        return "{" + ", ".join(super(SetOfObjects, self).format(torch.tensor(v), names) for v in found) + "}"


class CropInteraction(nn.Module):
    """Each crop's features (B, K, F) with what it reads of the other crops: (B, K, 2F).

    Crop k attends to the crops j != k with scores q_k . k_j (queries and keys of ``dim`` units, from the features
    plus a learnt embedding of each transformer, which breaks the tie between two crops of one object) and takes the
    weighted mean of their features. With K = 1 there is no other crop and the second half is zero.
    """

    def __init__(self, in_features: int, num_crops: int, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(num_crops, in_features))
        self.query = nn.Linear(in_features, dim)
        self.key = nn.Linear(in_features, dim)
        self.scale = dim**-0.5

    def forward(self, features: Tensor) -> Tensor:
        k = features.shape[1]
        x = features + self.embed
        scores = self.query(x) @ self.key(x).transpose(1, 2) * self.scale  # (B, K, K)
        itself = torch.eye(k, dtype=torch.bool, device=features.device)
        # K = 1: no other crop; zero weights keep the queries and keys in the graph (DDP expects every parameter used).
        weights = torch.softmax(scores.masked_fill(itself, float("-inf")), dim=-1) if k > 1 else scores * 0
        return torch.cat([features, weights @ features], dim=-1)


#: How far a suppressed crop's "nothing" logit is raised above its largest: "nothing" then has probability
#: above 1 - e^-10 for it.
SUPPRESSED_MARGIN = 10.0


def keep_distinct(iou: Tensor, score: Tensor, threshold: float) -> Tensor:
    """Greedy non-maximum suppression over the K windows of each image.

    In the order of ``score`` (highest first, ties by index), a window is kept when its score is above 0 and its IoU
    with every window kept before it is at most ``threshold``; windows of score 0 (those that say "nothing") are
    never kept and never suppress another. The loop runs over K, not over the batch, so it traces and exports.

    Args:
        iou: (B, K, K) pairwise IoU of the windows (:func:`~stn_lightning.metrics.region_iou`).
        score: (B, K) confidence of each window's answer, 0 for no answer.
        threshold: the IoU above which the later window is dropped.

    Returns:
        (B, K) bool: the windows kept.
    """
    b, k = score.shape
    index = torch.arange(k, device=score.device)
    # Each window's place in the order: how many windows come before it (higher score, or equal and a lower index).
    # Counting instead of sorting keeps ties in index order and the graph free of sorts (ONNX has no stable sort).
    before = (score[:, None, :] > score[:, :, None]) | (
        (score[:, None, :] == score[:, :, None]) & (index[None, :] < index[:, None])
    )
    rank = before.sum(-1)  # (B, K)
    kept = torch.zeros(b, k, dtype=torch.bool, device=score.device)
    for r in range(k):
        current = rank == r  # (B, K): one window per image
        overlaps = (iou * current[:, :, None]).sum(1) > threshold  # (B, K): the current window's IoU with each
        answers = (score * current).sum(1) > 0
        keep = answers & ~(overlaps & kept).any(1)
        kept = kept | (current & keep[:, None])
    return kept


def match_objects(log_p: Tensor, target: Tensor) -> Tensor:
    """What each crop should answer: the class of the object it is matched to, or "nothing".

    The K crops of each image are matched one-to-one to its D objects (the targets' values >= 0) by the assignment of
    least total cost -log p(crop k shows object d) (``scipy.optimize.linear_sum_assignment``, on the CPU: the (B, K,
    D) cost matrix is moved there once per batch). With K > D, K - D crops get "nothing"; with D > K, D - K objects
    are left out.

    Args:
        log_p: (B, K, C + 1) log-probabilities of each crop over C classes and "nothing" (last).
        target: (B, D) int64, the objects' classes in any order and -1 for empty slots.

    Returns:
        (B, K) int64 on ``log_p``'s device: the matched object's class, or C ("nothing").
    """
    b, k, classes = log_p.shape
    nothing = classes - 1
    target = target.long()
    present = target >= 0
    cost = -log_p.detach().gather(2, target.clamp(min=0)[:, None, :].expand(b, k, -1).to(log_p.device))  # (B, K, D)
    cost_cpu, present_cpu, target_cpu = cost.float().cpu().numpy(), present.cpu().numpy(), target.cpu()
    answers = torch.full((b, k), nothing, dtype=torch.long)
    for i in range(b):
        columns = present_cpu[i].nonzero()[0]
        if len(columns) == 0:
            continue
        crops, objects = linear_sum_assignment(cost_cpu[i][:, columns])
        answers[i, torch.from_numpy(crops)] = target_cpu[i, torch.from_numpy(columns[objects])]
    return answers.to(log_p.device)


def decode_set(outputs: Tensor, num_slots: int, num_classes: int) -> dict[str, Tensor]:
    """The answers of :class:`SetOfObjects`'s outputs (B, K (num_classes + 1)) (see :meth:`SetOfObjects.decode`)."""
    crop_probs = outputs.float().unflatten(1, (num_slots, num_classes + 1)).softmax(-1)
    top, answer = crop_probs.max(-1)
    prediction = answer.masked_fill(answer == num_classes, -1)
    return {"prediction": prediction, "probs": top.prod(-1), "crop_probs": crop_probs}


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """How many times each class occurs in each row: labels (B, N) int, -1 for none -> counts (B, num_classes)."""
    present = labels >= 0
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, labels.clamp(min=0).long(), present.long())


class SetAccuracy(torchmetrics.Metric):
    """Accuracy of :class:`SetOfObjects`: the images whose predicted multiset (the crops that do not say "nothing")
    equals the true one (``"set"``), or whose predicted number of objects is right (``"count"``).

    Args:
        num_slots, num_classes: the task's K and object classes.
        what: "set" or "count".
    """

    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, num_slots: int, num_classes: int, what: str = "set", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if what not in ("set", "count"):
            raise ValueError(f"expected what in ('set', 'count'), got {what!r}")
        self.size = (num_slots, num_classes)
        self.what = what
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Tensor, target: Tensor) -> None:
        predicted = class_counts(decode_set(outputs.detach(), *self.size)["prediction"], self.size[1])
        true = class_counts(target, self.size[1])
        right = (predicted == true).all(1) if self.what == "set" else predicted.sum(1) == true.sum(1)
        self.correct += right.sum()
        self.total += len(target)

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


class SetF1(torchmetrics.Metric):
    """F1 score of the objects :class:`SetOfObjects` finds, micro-averaged over every object of every image.

    In each image, the objects found of class c are min(predicted c, true c); summed over the classes and images
    they are the true positives TP, the other predictions false positives FP and the other objects false negatives
    FN; F1 = 2 TP / (2 TP + FP + FN) (1 when nothing was there and nothing was claimed).

    Args:
        num_slots, num_classes: the task's K and object classes.
    """

    full_state_update = False
    tp: Tensor
    fp: Tensor
    fn: Tensor

    def __init__(self, num_slots: int, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = (num_slots, num_classes)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Tensor, target: Tensor) -> None:
        predicted = class_counts(decode_set(outputs.detach(), *self.size)["prediction"], self.size[1])
        true = class_counts(target, self.size[1])
        found = torch.minimum(predicted, true).sum()
        self.tp += found
        self.fp += predicted.sum() - found
        self.fn += true.sum() - found

    def compute(self) -> Tensor:
        denominator = 2 * self.tp + self.fp + self.fn
        if int(denominator) == 0:
            return torch.ones((), device=self.tp.device)
        return 2 * self.tp.float() / denominator.float()
