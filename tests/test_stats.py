import pytest
import torch

from utils import EpochStats, topk_correct


def test_sums_become_averages_and_percentages():
    stats = EpochStats(['ce', 'kd', 'correct1', 'correct5', 'n'], ['ce', 'kd'], 'cpu')
    stats.add(torch.tensor([2.0 * 4, 1.0 * 4, 3, 4, 4]))   # batch of 4: ce 2, kd 1, 3 right
    stats.add(torch.tensor([4.0 * 6, 0.5 * 6, 3, 5, 6]))   # batch of 6
    v = stats.values()
    assert v['n'] == 10
    assert v['ce'] == pytest.approx((8 + 24) / 10) and v['kd'] == pytest.approx((4 + 3) / 10)
    assert v['top1'] == pytest.approx(60.0) and v['top5'] == pytest.approx(90.0)
    assert stats.non_finite() is None


def test_the_earliest_non_finite_term_is_named():
    stats = EpochStats(['ce', 'kd', 'n'], ['ce', 'kd'], 'cpu')
    stats.add(torch.tensor([1.0, 1.0, 1]))
    stats.add(torch.tensor([1.0, float('nan'), 1]))
    stats.add(torch.tensor([float('inf'), float('nan'), 1]))
    assert stats.non_finite() == ('kd', 2)


def test_loss_terms_must_come_first():
    with pytest.raises(ValueError):
        EpochStats(['correct1', 'ce', 'n'], ['ce'], 'cpu')


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    # sample 0: top-1 right; sample 1: its class ranks 2nd (tie with 3rd); sample 2: 3rd
    c1, c2 = topk_correct(logits, target, ks=(1, 3)).tolist()
    assert c1 == 1 and c2 == 3


def test_a_new_epoch_starts_from_zero_in_the_same_tensors():
    """A captured step keeps writing the tensors it was captured with: reset
    clears them in place for the next epoch, the non-finite record included."""
    stats = EpochStats(['ce', 'n'], ['ce'], 'cpu')
    tensors = (stats.total, stats.first_bad, stats.step)
    stats.add(torch.tensor([float('nan'), 4.0]))
    stats.reset()
    assert (stats.total, stats.first_bad, stats.step) == tensors  # the same objects
    assert stats.non_finite() is None and stats.step.item() == 0
    stats.add(torch.tensor([3.0 * 2, 2.0]))
    assert stats.values() == {'ce': 3.0, 'n': 2}
