"""IRG: vertex (logit MSE), edges (max-normalised squared pairwise distances of
feat, rb2, rb3; MSE, mean of three) and transformation (rb2 pooled to rb3's
size, rb3's channels averaged in pairs, squared distance per sample divided by
the max; MSE), against loops over samples and pairs."""
import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import IRG, METHODS, ConfigError, Distiller


def as_np(x):
    return x.detach().double().numpy()


def edge_reference(x):
    f = as_np(x).reshape(len(x), -1)
    n = len(f)
    d = np.array([[np.sum((f[i] - f[j]) ** 2) if i != j else 0.0 for j in range(n)]
                  for i in range(n)])
    return d / d.max()


def transformation_reference(fm2, fm3):
    fm2, fm3 = as_np(fm2), as_np(fm3)
    dist = []
    for a, b in zip(fm2, fm3):
        c, h, w = b.shape
        pooled = np.array([[[a[k, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for j in range(w)]
                            for i in range(h)] for k in range(a.shape[0])])
        paired = np.array([(b[2 * k] + b[2 * k + 1]) / 2 for k in range(c // 2)])
        dist.append(np.sum((pooled - paired) ** 2))
    dist = np.array(dist)
    return dist / dist.max()


def irg_reference(irg_s, irg_t, w_vert, w_edge, w_tran):
    fm2_s, fm3_s, feat_s, out_s = irg_s
    fm2_t, fm3_t, feat_t, out_t = irg_t
    vertex = np.mean((as_np(out_s) - as_np(out_t)) ** 2)
    edge = np.mean([np.mean((edge_reference(s) - edge_reference(t)) ** 2)
                    for s, t in ((feat_s, feat_t), (fm2_s, fm2_t), (fm3_s, fm3_t))])
    tran = np.mean((transformation_reference(fm2_s, fm3_s)
                    - transformation_reference(fm2_t, fm3_t)) ** 2)
    return w_vert * vertex + w_edge * edge + w_tran * tran


def random_graph(seed, batch=4, c2=4, hw2=4, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c2, hw2, hw2, generator=g) * scale,
            torch.randn(batch, 2 * c2, hw2 // 2, hw2 // 2, generator=g) * scale,
            torch.randn(batch, 2 * c2, generator=g) * scale,
            torch.randn(batch, 5, generator=g)]


def test_matches_reference():
    s, t = random_graph(0), random_graph(1, scale=2.0)
    expected = irg_reference(s, t, 0.1, 5.0, 5.0)
    assert IRG(0.1, 5.0, 5.0)(s, t).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize('weights', [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_each_term_matches_reference(weights):
    s, t = random_graph(2), random_graph(3)
    assert IRG(*weights)(s, t).item() == pytest.approx(irg_reference(s, t, *weights), rel=1e-4)


def test_hand_cases():
    # vertex only: logits differ by 2 in one of 2 x 5 entries -> 4 / 10
    s, t = random_graph(4, batch=2), random_graph(4, batch=2)
    t[3] = s[3].clone()
    t[3][0, 0] += 2.0
    assert IRG(1.0, 0.0, 0.0)(s, t).item() == pytest.approx((2.0 ** 2) / 10)
    # edges of feat only: three samples on a line at 0, 1, 2 -> squared 1, 4, 1, normalised
    # by 4; against an equilateral triangle (all 1 after normalising): diffs 3/4 (x4), 0 (x2)
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    triangle = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3 ** 0.5 / 2]])
    assert IRG.edges(line).flatten().tolist() == pytest.approx([0, .25, 1, .25, 0, .25, 1, .25, 0])
    expected = 4 * (0.75 ** 2) / 9
    edge_mse = torch.nn.functional.mse_loss(IRG.edges(line), IRG.edges(triangle))
    assert edge_mse.item() == pytest.approx(expected)
    # transformation: rb3's channel pair (1, 3) averages to 2 (4 for the second sample),
    # rb2 pools to 0 -> squared distances 4 and 16, divided by the max
    fm2 = torch.zeros(2, 1, 2, 2)
    fm3 = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    assert IRG.transformation(fm2, fm3).tolist() == pytest.approx([0.25, 1.0])


def test_identical_or_rescaled_graphs_give_zero():
    s = random_graph(5)
    assert IRG(0.1, 5.0, 5.0)(s, s).item() == pytest.approx(0.0, abs=1e-7)
    # edges and transformation are max-normalised: scaling the maps and feat changes nothing
    t = [x * 3.0 for x in s[:3]] + [s[3]]
    assert IRG(0.1, 5.0, 5.0)(s, t).item() == pytest.approx(0.0, abs=1e-6)


def test_batch_of_one_is_finite():
    s = [x.requires_grad_(True) for x in random_graph(6, batch=1)]
    out = IRG(0.1, 5.0, 5.0)(s, random_graph(7, batch=1))
    out.backward()
    assert torch.isfinite(out) and all(torch.isfinite(x.grad).all() for x in s)


def test_float32_result_for_low_precision_inputs():
    out = IRG(0.1, 5.0, 5.0)([x.bfloat16() for x in random_graph(8)],
                             [x.bfloat16() for x in random_graph(9)])
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_registry():
    method = METHODS['irg']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    # the weights' defaults (0.1, 5, 5) are those of
    # test_distiller_feeds_rb2_rb3_post_feat_out_and_detaches_the_teacher
    assert all(method.flags[k].type is float for k in ('w_irg_vert', 'w_irg_edge', 'w_irg_tran'))
    with pytest.raises(ConfigError, match='w_irg'):
        method.build(make_context('irg', {'w_irg_edge': -1.0}))
    ctx = make_context('irg')
    ctx.teacher_shapes = {**ctx.teacher_shapes, 'rb3': (48, 8, 8)}
    with pytest.raises(ConfigError, match='teacher rb3'):
        method.build(ctx)


def test_distiller_feeds_rb2_rb3_post_feat_out_and_detaches_the_teacher():
    ctx = make_context('irg')
    distiller = METHODS['irg'].build(ctx)
    assert isinstance(distiller, Distiller)
    assert distiller.pretrain_phases(ctx) == [] and distiller.kd_weight(1, 200) == 1.0
    assert list(distiller.learnable_parameters()) == [] and not distiller.teacher_grad
    s, s_leaves = make_features(batch=4, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=4, seed=1, requires_grad=True)
    loss = sum(distiller(s, t, None).values())  # the weighted terms, logged on their own
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = irg_reference([s.rb2[1], s.rb3[1], s.feat, s.out],
                             [t.rb2[1], t.rb3[1], t.feat, t.out], 0.1, 5.0, 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    for name in ('rb2', 'rb3', 'feat', 'out'):
        assert s_leaves[name].grad.abs().sum() > 0
    assert s_leaves['rb1'].grad is None and s_leaves['stem'].grad is None
    assert all(leaf.grad is None for leaf in t_leaves.values())


def test_the_last_two_of_four_stages_and_the_refusal_names_both_shapes():
    from network import Features4
    four = {'stem': (4, 8, 8), 'rb1': (4, 8, 8), 'rb2': (6, 4, 4), 'rb3': (8, 4, 4),
            'rb4': (16, 2, 2), 'feat': (16,), 'out': (10,)}
    ctx = make_context('irg')
    ctx.student_shapes, ctx.teacher_shapes = four, {**four, 'rb3': (12, 4, 4), 'rb4': (24, 2, 2)}
    distiller = METHODS['irg'].build(ctx)
    assert (distiller.early, distiller.late) == ('rb3', 'rb4')
    g = torch.Generator().manual_seed(3)

    def features(shapes):
        maps = {k: torch.randn(4, *shapes[k], generator=g) for k in ('stem', 'rb1', 'rb2', 'rb3', 'rb4')}
        return Features4(*[(m, torch.relu(m)) for m in maps.values()],
                         torch.randn(4, shapes['feat'][0], generator=g), torch.randn(4, 10, generator=g))

    s, t = features(ctx.student_shapes), features(ctx.teacher_shapes)
    loss = sum(distiller(s, t, None).values())
    expected = irg_reference([s.rb3[1], s.rb4[1], s.feat, s.out], [t.rb3[1], t.rb4[1], t.feat, t.out],
                             0.1, 5.0, 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # MobileNetV2's last two stages: 160 channels do not average down to 48
    ctx.student_shapes = {**four, 'rb3': (48, 4, 4), 'rb4': (160, 2, 2)}
    with pytest.raises(ConfigError, match=r'student rb4 \(160, 2, 2\).*rb3 \(48, 4, 4\)'):
        METHODS['irg'].build(ctx)
