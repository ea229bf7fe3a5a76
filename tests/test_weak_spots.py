"""Small pieces whose mistakes would not show elsewhere: top-k counting when
k exceeds the number of classes, and the step schedule's milestones for
epoch counts that do not divide evenly."""
import pytest
import torch

from utils import lr_at, topk_correct

# ----------------------------------------------------------------------------- top-k

# 4 samples, 3 classes; the rank of each sample's target among its logits, by hand:
#   sample 0: order (0, 1, 2), target 0 -> rank 1
#   sample 1: order (1, 2, 0), target 2 -> rank 2
#   sample 2: order (2, 0, 1), target 0 -> rank 2
#   sample 3: order (2, 1, 0), target 0 -> rank 3
LOGITS = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [2.0, 1.0, 3.0], [1.0, 2.0, 3.0]])
TARGET = torch.tensor([0, 2, 0, 0])
# correct within top-k = number of ranks <= k: k=1 -> 1, k=2 -> 3, k>=3 -> 4


@pytest.mark.parametrize('ks, expected', [
    ((1,), [1]), ((2,), [3]), ((1, 2, 3), [1, 3, 4]),
    ((1, 5), [1, 4]),            # the default ks with 3 classes: top-5 counts every sample
    ((5, 1), [4, 1]),            # the order of ks is kept
    ((3, 4, 100), [4, 4, 4])])   # at and above the class count: all of them
def test_topk_correct_below_at_and_above_the_class_count(ks, expected):
    got = topk_correct(LOGITS, TARGET, ks=ks)
    assert got.dtype.is_floating_point and got.shape == (len(ks),)
    assert got.tolist() == expected


def test_topk_correct_default_ks_on_ten_classes():
    # sample i has its target at rank i + 1 (logits descending from class 0, target = class i)
    logits = torch.arange(10, 0, -1, dtype=torch.float32).repeat(8, 1)  # class 0 highest
    target = torch.arange(8)                                             # ranks 1..8
    assert topk_correct(logits, target).tolist() == [1, 5]               # ranks <= 1, ranks <= 5
    # two classes: top-5 is everything, top-1 the argmax
    logits = torch.tensor([[0.2, 0.1], [0.3, 0.9], [5.0, -1.0]])
    assert topk_correct(logits, torch.tensor([1, 1, 1])).tolist() == [1, 3]


# ----------------------------------------------------------------------------- lr schedule

def documented_lr(epoch, epochs, lr):
    """The documented rule: epochs 1..ceil(E/2) lr, ..ceil(3E/4) lr/10, the rest lr/100
    (ceilings in integer arithmetic)."""
    first, second = (epochs + 1) // 2, (3 * epochs + 3) // 4
    return lr if epoch <= first else lr / 10 if epoch <= second else lr / 100


def test_three_epochs_by_hand():
    # ceil(1.5) = 2 and ceil(2.25) = 3: lr, lr, lr/10 (no lr/100 epoch)
    assert [lr_at(e, 3, 0.1) for e in (1, 2, 3)] == pytest.approx([0.1, 0.1, 0.01])


def test_the_seed_boundaries_at_200_epochs():
    lr = 0.1
    assert lr_at(100, 200, lr) == pytest.approx(0.1) and lr_at(101, 200, lr) == pytest.approx(0.01)
    assert lr_at(150, 200, lr) == pytest.approx(0.01) and lr_at(151, 200, lr) == pytest.approx(0.001)
    assert lr_at(1, 200, lr) == pytest.approx(0.1) and lr_at(200, 200, lr) == pytest.approx(0.001)


@pytest.mark.parametrize('epochs', list(range(1, 14)) + [30, 75, 160, 200, 201])
def test_every_epoch_follows_the_documented_rule(epochs):
    got = [lr_at(e, epochs, 0.2) for e in range(1, epochs + 1)]
    assert got == pytest.approx([documented_lr(e, epochs, 0.2) for e in range(1, epochs + 1)])
