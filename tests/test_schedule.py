import pytest

from utils import lr_at


def test_the_seed_schedule_at_200_epochs():
    # The seed: lr for epochs 1-100, lr/10 for 101-150, lr/100 for 151-200.
    expected = [0.1] * 100 + [0.01] * 50 + [0.001] * 50
    assert [lr_at(e, 200, 0.1) for e in range(1, 201)] == pytest.approx(expected)


@pytest.mark.parametrize('epochs, expected', [
    (1, [1.0]), (2, [1.0, 0.1]), (4, [1, 1, 0.1, 0.01]), (30, [1] * 15 + [0.1] * 8 + [0.01] * 7)])
def test_milestones_scale_with_the_number_of_epochs(epochs, expected):
    assert [lr_at(e, epochs, 1.0) for e in range(1, epochs + 1)] == pytest.approx(expected)
