"""BSS: KL at temperature T on adversarial samples near the teacher's
decision boundary; sample selection, attack-class draw, attack, schedule."""
import copy

import numpy as np
import pytest
import torch

from conftest import make_context
from dataset import Batch
from kd_losses import BSS, METHODS, ConfigError, Distiller, all_flags
from kd_losses.bss import attack, draw_attack_class, select_samples
from network import resnet20


def softmax_np(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl_np(out_s, out_t, T):
    """Per-sample KL(softmax(t/T) || softmax(s/T)), explicit sum over classes."""
    ps, pt = softmax_np(out_s / T), softmax_np(out_t / T)
    return np.array([sum(pt[i, c] * np.log(pt[i, c] / ps[i, c]) for c in range(ps.shape[1]))
                     for i in range(len(ps))])


def bn_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if 'running' in k or 'num_batches' in k}


# ---------------------------------------------------------------- the loss

def test_kl_formula_without_T_squared():
    g = torch.Generator().manual_seed(0)
    out_s, out_t = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    for T in (1.0, 3.0):
        want = kl_np(out_s.double().numpy(), out_t.double().numpy(), T).mean()
        assert BSS(T)(out_s, out_t).item() == pytest.approx(want, rel=1e-5)


def test_kl_hand_checkable():
    # T=1; teacher (1/2, 1/2), student (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    out_t = torch.zeros(1, 2)
    out_s = torch.log(torch.tensor([[0.25, 0.75]]))
    want = 0.5 * np.log(2) + 0.5 * np.log(2 / 3)
    assert BSS(1.0)(out_s, out_t).item() == pytest.approx(want, rel=1e-6)
    assert BSS(3.0)(out_t, out_t).item() == pytest.approx(0, abs=1e-7)


def test_masked_mean_over_valid_rows_and_zero_when_none():
    g = torch.Generator().manual_seed(1)
    out_s = torch.randn(5, 4, generator=g).requires_grad_(True)
    out_t = torch.randn(5, 4, generator=g)
    valid = torch.tensor([True, False, True, True, False])
    kl = kl_np(out_s.detach().double().numpy(), out_t.double().numpy(), 3.0)
    assert BSS(3.0)(out_s, out_t, valid).item() == pytest.approx(kl[[0, 2, 3]].mean(), rel=1e-5)

    out_s_nan = out_s.detach().clone()
    out_s_nan[1] = float('nan')  # a masked row must not leak into the loss
    none = torch.zeros(5, dtype=torch.bool)
    assert BSS(3.0)(out_s_nan, out_t, valid).item() == pytest.approx(kl[[0, 2, 3]].mean(), rel=1e-5)
    loss = BSS(3.0)(out_s, out_t, none)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(out_s.grad).all() and out_s.grad.abs().sum() == 0


# ---------------------------------------------------------------- selection and attack class

def test_selection_matches_the_seed_rule():
    g = torch.Generator().manual_seed(2)
    for trial in range(20):
        b, k = 12, 4
        out_s, out_t = torch.randn(b, 5, generator=g) * 2, torch.randn(b, 5, generator=g) * 2
        target = torch.where(torch.rand(b, generator=g) < 0.7, out_t.argmax(1),
                             torch.randint(0, 5, (b,), generator=g))
        idx, valid = select_samples(out_s, out_t, target, k)
        # the seed: every sample both nets get right; if too many, largest non-target score first
        s, t, y = out_s.numpy(), out_t.numpy(), target.numpy()
        both = [i for i in range(b) if s[i].argmax() == y[i] and t[i].argmax() == y[i]]
        if len(both) > k:
            ps, pt = softmax_np(s), softmax_np(t)
            score = {i: sum((pt[i, c] - ps[i, c]) ** 2 for c in range(5) if c != y[i])
                     for i in both}
            both = sorted(both, key=lambda i: -score[i])[:k]
        assert idx.shape == (k,) and valid.shape == (k,)
        assert sorted(idx[valid].tolist()) == sorted(both)
        assert len(set(idx.tolist())) == k  # padding rows are other, distinct samples


def test_attack_class_never_top1_and_follows_teacher_softmax():
    torch.manual_seed(3)
    out_t = torch.tensor([[2.0, 0.5, 3.0, -1.0, 1.0]])
    draws = draw_attack_class(out_t.expand(40000, 5))
    assert not (draws == 2).any()
    p = softmax_np(out_t.numpy()[0].astype(np.float64))
    want = np.where(np.arange(5) == 2, 0.0, p / (1 - p[2]))
    freq = np.bincount(draws.numpy(), minlength=5) / len(draws)
    np.testing.assert_allclose(freq, want, atol=0.015)

    rows = torch.randn(256, 10) * 5
    for _ in range(10):
        assert not (draw_attack_class(rows) == rows.argmax(1)).any()


def test_attack_class_with_saturated_teacher():
    # softmax underflows to 0 for every class but the top-1: still a valid, non-top-1 draw
    out_t = torch.tensor([[0.0, 200.0, -50.0, -300.0]]).expand(1000, 4)
    draws = draw_attack_class(out_t)
    assert not (draws == 1).any()
    assert (draws == 0).float().mean() > 0.99  # the runner-up dominates


# ---------------------------------------------------------------- the attack

# Images are 8x8: the nets are fully convolutional and the tests stay fast on CPU.


def teacher_net(num_class=10, seed=0):
    torch.manual_seed(seed)
    return resnet20(num_class).eval()


def test_one_attack_step_matches_per_sample_computation():
    teacher = teacher_net()
    g = torch.Generator().manual_seed(4)
    img = torch.randn(6, 3, 8, 8, generator=g)
    img[:, 0, 0, 0] = 3.0   # outside the clamp range
    with torch.no_grad():
        out = teacher(img).out
    target = out.argmax(1)
    target[4] = (target[4] + 1) % 10                   # the teacher is wrong: not moved, clamped
    attack_class = (out.argsort(1, descending=True)[:, 1])
    active = torch.tensor([True, True, False, True, True, True])  # sample 2 not selected
    x1 = attack(teacher, img, target, attack_class, active, steps=1)

    for i in range(6):
        x = img[i:i + 1].clone().requires_grad_(True)
        p = torch.softmax(teacher(x).out[0], 0)
        y, a = target[i].item(), attack_class[i].item()
        (p[a] - p[y]).backward()
        if not active[i]:
            want = img[i:i + 1]
        elif p.argmax().item() == y:
            step = 0.3 * (p[y] - p[a]).item() + 0.3 * 1e-4
            want = (img[i:i + 1] + step * x.grad / x.grad.norm()).clamp(-2.5, 2.5)
        else:
            want = img[i:i + 1].clamp(-2.5, 2.5)
        assert torch.allclose(x1[i:i + 1], want, rtol=1e-5, atol=1e-6), i
    assert not torch.equal(x1[0], img[0].clamp(-2.5, 2.5))  # it did move


def test_attack_moves_only_selected_within_bounds_and_leaves_teacher_untouched():
    teacher = teacher_net()  # parameters require grad here: they must still get none
    buffers = bn_buffers(teacher)
    g = torch.Generator().manual_seed(5)
    img = torch.randn(8, 3, 8, 8, generator=g) * 1.5
    with torch.no_grad():
        out = teacher(img).out
    target = out.argmax(1)
    attack_class = out.argsort(1, descending=True)[:, 1]
    active = torch.tensor([True, False, True, True, False, True, True, False])
    x = attack(teacher, img, target, attack_class, active)

    assert torch.equal(x[~active], img[~active])
    assert (x[active] != img[active].clamp(-2.5, 2.5)).any(dim=(1, 2, 3)).all()
    assert x[active].abs().max() <= 2.5
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for k, v in bn_buffers(teacher).items():
        assert torch.equal(v, buffers[k]), k
    # it pushes towards the attack class
    with torch.no_grad():
        before, after = out.softmax(1), teacher(x).out.softmax(1)
    rows = torch.arange(8)[active]
    margin = lambda p: p[rows, attack_class[rows]] - p[rows, target[rows]]
    assert (margin(after) > margin(before)).all()


# ---------------------------------------------------------------- the distiller

def nets(num_class=10, seed=0):
    torch.manual_seed(seed)
    student, teacher = resnet20(num_class), resnet20(num_class)
    return student.train(), teacher.eval()


def test_registry_entry_flags_and_build_checks():
    method = METHODS['bss']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    # the other defaults as the built distiller uses them: T 3, 32 attacked samples, and
    # no KD for the 10 warm-up epochs of 200
    student, teacher = nets()
    built = method.build(make_context('bss', student=student, teacher=teacher))
    assert built.loss.T == 3.0 and built.attack_size == 32
    assert [built.kd_weight(e, 200) for e in (1, 10)] == [0.0, 0.0] and built.kd_weight(11, 200) > 0
    assert method.flags['T'].type is float and method.flags['attack_size'].type is int
    assert method.flags['warmup_epochs'].type is int
    assert all_flags()['T'][1]['bss'] == 3.0  # shared with st, same type
    with pytest.raises(ConfigError, match='student'):
        method.build(make_context('bss'))
    student, teacher = nets()
    with pytest.raises(ConfigError, match='warmup_epochs'):
        method.build(make_context('bss', {'warmup_epochs': -1}, student=student, teacher=teacher))


def test_networks_are_not_owned():
    student, teacher = nets()
    distiller = METHODS['bss'].build(make_context('bss', student=student, teacher=teacher))
    assert isinstance(distiller, Distiller) and not distiller.teacher_grad
    assert list(distiller.parameters()) == [] and distiller.learnable_parameters() == []
    assert len(distiller.state_dict()) == 0
    distiller.train()
    assert not teacher.training


def test_kd_weight_schedule():
    student, teacher = nets()
    d = METHODS['bss'].build(make_context('bss', student=student, teacher=teacher))
    assert all(d.kd_weight(e, 200) == 0.0 for e in range(1, 11))                 # warm-up
    for e in (11, 50, 100, 160):
        assert d.kd_weight(e, 200) == pytest.approx(max(0.0, 1 - 1.25 * (e - 1) / 200))
    assert d.kd_weight(11, 200) == pytest.approx(0.9375)
    assert all(d.kd_weight(e, 200) == 0.0 for e in range(161, 201))              # last 20%
    assert d.kd_weight(100, 200) > 0
    d0 = METHODS['bss'].build(make_context('bss', {'warmup_epochs': 0}, student=student,
                                           teacher=teacher))
    assert d0.kd_weight(1, 200) == 1.0 and d0.kd_weight(3, 10) == pytest.approx(0.75)


def seed_selection(out_s, out_t, target, attack_size):
    """The seed's choice of samples, written as a loop."""
    s, t, y = out_s.numpy(), out_t.numpy(), target.tolist()
    chosen = [i for i in range(len(y)) if s[i].argmax() == y[i] and t[i].argmax() == y[i]]
    if len(chosen) > attack_size:
        ps, pt = softmax_np(s), softmax_np(t)
        score = {i: sum((pt[i, c] - ps[i, c]) ** 2 for c in range(s.shape[1]) if c != y[i])
                 for i in chosen}
        chosen = sorted(chosen, key=lambda i: -score[i])[:attack_size]
    return chosen


def seed_attacked_kl(student, teacher, x, y, T):
    """One sample attacked as the seed does, for two classes (the attack class
    is the teacher's other class: no random draw), then its KL."""
    a = 1 - y
    for _ in range(10):
        x = x.detach().requires_grad_(True)
        logits = teacher(x).out[0]
        p = torch.softmax(logits, 0)
        (p[a] - p[y]).backward()
        with torch.no_grad():
            if logits.argmax().item() == y:
                x = x + 0.3 * (p[y] - p[a] + 1e-4) * x.grad / x.grad.norm()
            x = x.clamp(-2.5, 2.5)
    with torch.no_grad():
        return kl_np(student(x).out.double().numpy(), teacher(x).out.double().numpy(), T)[0]


def test_distiller_matches_the_seed_procedure():
    student, teacher = nets(num_class=2, seed=6)
    student.eval()  # eval: samples independent, so the reference can run them one by one
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(7)
    img = torch.randn(8, 3, 8, 8, generator=g)
    with torch.no_grad():
        out_t = teacher(img).out
    target = out_t.argmax(1)
    target[7] = 1 - target[7]                          # the teacher is wrong on sample 7
    qualify = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    margin = torch.rand(8, generator=g) * 4 + 0.1      # varied scores for the ranking
    sign = torch.where(qualify, 1.0, -1.0)
    out_s = torch.zeros(8, 2)
    out_s[torch.arange(8), target] = sign * margin     # student right exactly where qualify
    s = student(img)._replace(out=out_s)
    t = teacher(img)._replace(out=out_t)
    kl = {i: seed_attacked_kl(student, teacher, img[i:i + 1], target[i].item(), 3.0)
          for i in seed_selection(out_s, out_t, target, 8)}
    assert sorted(kl) == [0, 2, 3, 5, 6]
    for attack_size in (3, 32):  # the seed ranks 5 samples / takes all 5 (padded to 8 here)
        chosen = seed_selection(out_s, out_t, target, attack_size)
        want = np.mean([kl[i] for i in chosen])
        distiller = METHODS['bss'].build(make_context('bss', {'attack_size': attack_size},
                                                      num_class=2, student=student, teacher=teacher))
        loss = distiller(s, t, Batch(img, target, torch.arange(8)))
        assert want > 0 and loss.item() == pytest.approx(want, rel=1e-4)


def test_no_qualifying_sample_gives_zero_without_nan():
    student, teacher = nets()
    teacher.requires_grad_(False)
    distiller = METHODS['bss'].build(make_context('bss', student=student, teacher=teacher))
    img = torch.randn(8, 3, 8, 8)
    s, t = student(img), teacher(img)
    target = (t.out.argmax(1) + 1) % 10                # the teacher is wrong everywhere
    loss = distiller(s, t, Batch(img, target, torch.arange(8)))
    assert loss.item() == 0.0
    loss.backward()  # the masked loss keeps its graph: zero, finite gradients
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_gradients_reach_student_teacher_untouched():
    student, teacher = nets(seed=8)
    buffers = bn_buffers(teacher)  # teacher parameters left requiring grad: must get none
    distiller = METHODS['bss'].build(make_context('bss', {'attack_size': 4}, student=student,
                                                  teacher=teacher))
    img = torch.randn(8, 3, 8, 8)
    s = student(img)
    with torch.no_grad():
        t = teacher(img)
    target = t.out.argmax(1)
    s = s._replace(out=s.out.detach().clone().scatter_(1, target[:, None], 100.0))  # all right
    loss = distiller(s, t, Batch(img, target, torch.arange(8)))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for k, v in bn_buffers(teacher).items():
        assert torch.equal(v, buffers[k]), k


def test_identical_nets_give_zero():
    _, teacher = nets(seed=9)
    student = copy.deepcopy(teacher)  # both in eval mode: the same function
    distiller = METHODS['bss'].build(make_context('bss', student=student, teacher=teacher))
    img = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        t = teacher(img)
    s = student(img)
    loss = distiller(s, t, Batch(img, t.out.argmax(1), torch.arange(8)))
    assert loss.item() == pytest.approx(0, abs=1e-6)
