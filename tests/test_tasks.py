"""Tasks (head + loss + metrics): the sequence head's loss, decoding and accuracies on hand-built batches, the sum
task's "nothing" class, and the module taking a task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stn_lightning.module import STNModule
from stn_lightning.tasks import Classification, SequenceAccuracy, SequenceReading, SumOfObjects
from stn_lightning.transformer import TransformerSpec

# Three strings (length, then the digits, -1 past the end) with max_length 3: "7", "12", "905".
TARGETS = torch.tensor([[1, 7, -1, -1], [2, 1, 2, -1], [3, 9, 0, 5]])


def _confident(targets: torch.Tensor, max_length: int = 3, classes: int = 10, margin: float = 8.0) -> torch.Tensor:
    # Outputs whose every head puts `margin` more logit on the target (and on 0 past the end).
    length = torch.zeros(len(targets), max_length + 1)
    length[torch.arange(len(targets)), targets[:, 0]] = margin
    symbols = torch.zeros(len(targets), max_length, classes)
    for b, row in enumerate(targets):
        for i in range(max_length):
            symbols[b, i, max(int(row[1 + i]), 0)] = margin
    return torch.cat([length, symbols.flatten(1)], dim=1)


def _sequence_task(max_length: int = 3, classes: int = 10) -> SequenceReading:
    task = SequenceReading(max_length)
    task.build(in_features=4, num_classes=classes, num_objects=1)
    return task


def test_sequence_loss_is_the_negative_log_likelihood_of_the_string() -> None:
    task = _sequence_task()
    torch.manual_seed(0)
    outputs = torch.randn(3, 4 + 3 * 10)
    length_logits, symbol_logits = task.split(outputs)
    expected = 0.0
    for b, row in enumerate(TARGETS):
        n = int(row[0])
        expected -= float(F.log_softmax(length_logits[b], -1)[n])
        for i in range(n):  # only the positions the string has
            expected -= float(F.log_softmax(symbol_logits[b, i], -1)[row[1 + i]])
    assert task.loss(outputs, TARGETS).item() == pytest.approx(expected / 3, rel=1e-5)
    assert task.loss(_confident(TARGETS), TARGETS).item() < 0.01


def test_sequence_decoding_and_accuracies() -> None:
    task = _sequence_task()
    outputs = _confident(TARGETS)
    decoded = task.decode(outputs)
    assert torch.equal(decoded["prediction"], TARGETS)
    assert [task.format(p) for p in decoded["prediction"]] == ["7", "12", "905"]
    # Spoil the second digit of "905" and the length of "12" (read as "120").
    wrong = outputs.clone()
    _, symbols = task.split(wrong)
    wrong[2, 4 + 1 * 10 + 0] = 0.0
    wrong[2, 4 + 1 * 10 + 3] = 8.0
    wrong[1, 2], wrong[1, 3] = 0.0, 8.0
    metrics = {name: metric for name, metric in task.metrics().items()}
    for metric in metrics.values():
        metric.update(wrong, TARGETS)
    got = {name: float(metric.compute()) for name, metric in metrics.items()}
    assert got["acc"] == pytest.approx(1 / 3)  # only "7" is read whole
    assert got["acc_length"] == pytest.approx(2 / 3)
    assert got["acc_digit1"] == pytest.approx(1.0)  # 3 strings reach position 1, all right
    assert got["acc_digit2"] == pytest.approx(1 / 2)  # "12" right, "905" wrong
    assert got["acc_digit3"] == pytest.approx(1.0)  # only "905" reaches it
    assert task.format(task.decode(wrong)["prediction"][2]) == "935"
    assert task.format(TARGETS[0], names=[f"<{d}>" for d in range(10)]) == "<7>"


def test_sequence_decoding_picks_the_most_probable_length() -> None:
    # The length head slightly prefers 3 over 2. With a sure third digit the string reads "905"; with an unsure one
    # (uniform: log 1/10) log P(L = 3) + log P(s_3) falls below log P(L = 2) and the most probable string is "90",
    # where the heads' separate argmaxes would still say 3 digits.
    task = _sequence_task()
    outputs = _confident(TARGETS[2:])
    outputs[0, :4] = torch.tensor([-9.0, -9.0, 0.0, 0.1])
    assert int(task.decode(outputs)["length"][0]) == 3
    outputs[0, 4 + 2 * 10 :] = 0.0
    decoded = task.decode(outputs)
    assert int(decoded["length"][0]) == 2 and task.format(decoded["prediction"][0]) == "90"


def test_sequence_targets_of_another_length_fail_clearly() -> None:
    task = _sequence_task(max_length=5)
    with pytest.raises(ValueError, match=r"max_length=5\) expected targets \(B, 6\)"):
        task.loss(torch.zeros(3, 6 + 50), TARGETS)


def test_sequence_accuracy_sums_over_updates() -> None:
    metric = SequenceAccuracy(3, 10, "sequence")
    metric.update(_confident(TARGETS[:2]), TARGETS[:2])
    metric.update(_confident(TARGETS[2:]), TARGETS[1:2].expand(1, -1))  # wrong
    assert float(metric.compute()) == pytest.approx(2 / 3)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_sum_with_nothing_lets_spare_transformers_add_zero(k: int) -> None:
    # Two digits (3 and 4) and k - 2 spare crops that say "nothing": the sum is 7 with certainty.
    task = SumOfObjects(object_classes=10, nothing=True)
    task.build(in_features=11, num_classes=19, num_objects=k)
    with torch.no_grad():
        task.head.weight.copy_(torch.eye(11) * 20)
        task.head.bias.zero_()
    features = torch.zeros(2, k, 11)
    features[:, 0, 3] = features[:, 1, 4] = 1.0
    features[0, 2:, 10] = 1.0  # the last class is "nothing"
    # In the second image the spare crops hesitate between "nothing" and a 0: both add 0, so the sum stays sure.
    features[1, 2:, 10] = features[1, 2:, 0] = 1.0
    log_p = task(features)
    assert log_p.shape == (2, 19)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(2))
    assert log_p.argmax(-1).tolist() == [7, 7] and (log_p[:, 7].exp() > 0.99).all()


def test_sum_with_nothing_needs_the_classes_per_object() -> None:
    # 3 crops on two-digit sums (19 classes) would otherwise read 7 classes per digit.
    with pytest.raises(ValueError, match="give object_classes"):
        SumOfObjects(nothing=True).build(in_features=4, num_classes=19, num_objects=3)


def test_three_transformers_on_two_digit_multimnist() -> None:
    # K = 3 on MultiMNIST's two digits: the model builds, and one step of the loss reaches every part.
    from stn_lightning.data import MultiMNIST
    from stn_lightning.transforms import Attention

    dm = MultiMNIST(2)
    # A training batch of 4 stand-in digits (squares), paired on the device as the DataModule pairs real ones.
    digits = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    digits[..., 6:22, 8:20] = 255
    raw = {"digits": digits, "labels": torch.tensor([[1], [2], [3], [4]])}
    x, y = dm.make_batch(raw, train=True, generator=torch.Generator().manual_seed(0))
    module = STNModule.for_data(
        dm,
        backbone="stn_paper_cnn_st",
        transformer=TransformerSpec(transform=Attention(scale_range=(0.4, 0.6)), num_transformers=3, crop_size=28),
        fusion="features",
        task=SumOfObjects(object_classes=10, nothing=True),
    )
    assert module.task.head.out_features == 11
    log_p = module(x)
    assert log_p.shape == (4, 19) and torch.allclose(log_p.exp().sum(-1), torch.ones(4), atol=1e-5)
    module.task.loss(log_p, y).backward()
    assert module.task.head.weight.grad is not None and module.transformer is not None
    assert module.transformer.head.weight.grad is not None


def test_sum_without_nothing_sums_every_crop() -> None:
    task = SumOfObjects(object_classes=10)
    task.build(in_features=10, num_classes=19, num_objects=3)
    with torch.no_grad():
        task.head.weight.copy_(torch.eye(10) * 20)
        task.head.bias.zero_()
    features = torch.zeros(1, 3, 10)
    features[0, 0, 3] = features[0, 1, 4] = features[0, 2, 5] = 1.0
    # 3 + 4 + 5 = 12 is a sum the data can hold; renormalised over 0..18 it stays certain.
    assert int(task(features).argmax(-1)) == 12


def test_sum_needs_enough_objects() -> None:
    task = SumOfObjects(object_classes=10)
    with pytest.raises(ValueError, match="sum to at most 9"):
        task.build(in_features=4, num_classes=19, num_objects=1)


def test_classification_metrics_and_decode() -> None:
    task = Classification()
    task.build(in_features=3, num_classes=10, num_objects=1)
    assert set(task.metrics()) == {"acc", "acc_top5"}
    decoded = task.decode(torch.log(torch.tensor([[0.1] * 9 + [0.1]]) * torch.arange(1, 11)))
    assert int(decoded["prediction"][0]) == 9 and decoded["probs"].sum().item() == pytest.approx(1.0)
    assert math.isclose(float(task.loss(torch.zeros(2, 10), torch.tensor([1, 2]))), math.log(10), rel_tol=1e-6)


def test_module_logs_the_tasks_metrics() -> None:
    module = STNModule(image_size=32, backbone="test_resnet", fusion="none", task=SequenceReading(3))
    names = set(module.metrics["test_metrics"].keys())
    assert {"test/acc", "test/acc_length", "test/acc_digit1", "test/acc_digit3"} <= names
    x = torch.randn(3, 1, 32, 32)
    assert module(x).shape == (3, 4 + 3 * 10)
    loss = module.task.loss(module(x), TARGETS)
    loss.backward()
    assert module.task.head.weight.grad is not None
