"""train_kd.py's training step against an independent computation, as
tests/test_train_dml.py does for DML: student, teacher and distiller are
built as train_kd.py builds them, one step runs, and every updated parameter
(student and the distiller's learnable ones) must equal the first SGD step
(Nesterov momentum, weight decay) on the gradient of CE + lambda * KD, with
the KD loss written out here from its formula and differentiated here on
deep copies. The teacher must come out bitwise unchanged and in eval mode."""
import copy

import pytest
import torch
import torch.nn.functional as F

import train_kd
from dataset import Batch

B, N_DATA = 8, 64
STAGES = ('rb1', 'rb2', 'rb3')


# ----------------------------------------------------------------------------- KD references
# Each takes the reference student's and the teacher's features and the deep-copied
# distiller (whose parameters are the leaves the gradient reaches), and returns the loss.

def st_kd(s, t, dist, args, batch):
    T = args.T
    p_t = torch.softmax(t.out / T, dim=1)
    log_p_s = torch.log_softmax(s.out / T, dim=1)
    return (p_t * (torch.log(p_t) - log_p_s)).sum(dim=1).mean() * T * T


def at_kd(s, t, dist, args, batch):
    total = 0.0
    for key in STAGES:
        maps = []
        for f in (getattr(s, key)[1], getattr(t, key)[1]):         # post-activation
            am = f.abs().pow(args.p).sum(dim=1).flatten(1)
            maps.append(am / (am.norm(dim=1, keepdim=True) + 1e-6))
        total = total + ((maps[0] - maps[1]) ** 2).mean()
    return total / len(STAGES)


def vid_kd(s, t, dist, args, batch):
    total = 0.0
    for i, key in enumerate(STAGES):
        convs = [m for m in dist.per_key[i].regressor if isinstance(m, torch.nn.Conv2d)]
        x = getattr(s, key)[1]
        x = F.conv2d(torch.relu(F.conv2d(torch.relu(F.conv2d(x, convs[0].weight)), convs[1].weight)),
                     convs[2].weight)
        var = F.softplus(dist.per_key[i].alpha) + 1e-6
        var = var.view(1, -1, 1, 1)
        total = total + (0.5 * (torch.log(var) + (x - getattr(t, key)[1]) ** 2 / var)).mean()
    return total / len(STAGES)


def crd_kd(s, t, dist, args, batch, sample_idx):
    crd = dist.crd
    v_s = F.normalize(F.linear(s.feat, crd.embed_s.weight, crd.embed_s.bias), dim=1)
    v_t = F.normalize(F.linear(t.feat, crd.embed_t.weight, crd.embed_t.bias), dim=1)
    c = args.nce_n / N_DATA
    total = 0.0
    for v, bank in ((v_t, crd.memory_s), (v_s, crd.memory_t)):
        rows = bank[sample_idx]                                      # [B, nce_n + 1, dim]
        scores = torch.exp((rows * v[:, None, :]).sum(-1) / args.nce_t)
        z = scores.detach().mean() * N_DATA                          # fixed on the first batch
        probs = scores / z
        pos, neg = probs[:, 0], probs[:, 1:]
        total = total - (torch.log(pos / (pos + c + 1e-7)).sum()
                         + torch.log(c / (neg + c + 1e-7)).sum()) / B
    return total, v_s.detach(), v_t.detach()


CASES = {
    'st': ([], st_kd),
    'at': ([], at_kd),
    'vid': (['--init_var', '3.0'], vid_kd),
    'crd': (['--nce_n', '16', '--feat_dim', '16'], crd_kd),
}


def build(mode, extra):
    argv = ['--data_name', 'cifar10', '--s_name', 'resnet20', '--t_name', 'resnet20',
            '--s_init', 'unused', '--t_model', 'unused', '--kd_mode', mode, '--device', 'cpu',
            '--epochs', '4', *extra]
    args, _, _ = train_kd.parse_args(argv)
    labels = torch.arange(N_DATA) % 10
    torch.manual_seed(0)
    model, teacher, distiller, _, main_phase, step = train_kd.build_distillation(
        args, torch.device('cpu'), N_DATA, labels, load_weights=False)
    return args, model, teacher, distiller, main_phase, step


@pytest.mark.parametrize('mode', sorted(CASES))
def test_one_kd_step_is_sgd_on_ce_plus_lambda_kd(mode):
    extra, reference_kd = CASES[mode]
    args, model, teacher, distiller, main_phase, step = build(mode, extra)
    main_phase.begin_epoch(1)  # what the loop does first: train modes, the epoch's KD weight
    lam = args.lambda_kd
    assert lam > 0 and args.ce_weight == 1.0

    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    idx = torch.randperm(N_DATA, generator=g)[:B]
    batch = Batch(x, y, idx)

    ref_model, ref_dist = copy.deepcopy(model), copy.deepcopy(distiller)
    ref_teacher = copy.deepcopy(teacher)
    teacher_before = {k: v.clone() for k, v in list(teacher.state_dict().items())}
    params = list(model.parameters()) + list(distiller.learnable_parameters())
    ref_params = list(ref_model.parameters()) + list(ref_dist.learnable_parameters())
    assert len(params) == len(ref_params)
    if mode in ('crd', 'vid'):  # embeddings / regressors, optimised with the student
        assert len(list(distiller.learnable_parameters())) > 0

    rng = torch.get_rng_state()
    sums = step(batch)

    # ---- the reference, on the copies
    with torch.no_grad():
        t = ref_teacher(x)
    s = ref_model(x)
    ce = F.cross_entropy(s.out, y)
    if mode == 'crd':
        torch.set_rng_state(rng)  # the same negatives as the step drew
        sample_idx = ref_dist.sample_contrast_idx(idx)
        assert sample_idx.shape == (B, args.nce_n + 1) and torch.equal(sample_idx[:, 0], idx)
        kd, v_s, v_t = crd_kd(s, t, ref_dist, args, batch, sample_idx)
    else:
        kd = reference_kd(s, t, ref_dist, args, batch)
    loss = ce + lam * kd
    grads = torch.autograd.grad(loss, ref_params, allow_unused=True, retain_graph=True)
    ce_grads = torch.autograd.grad(ce, ref_params, allow_unused=True)

    lr, m, wd = args.lr, args.momentum, args.weight_decay
    assert lr == 0.1 and m == 0.9 and wd == 1e-4 and main_phase.optimizer.param_groups[0]['nesterov']

    def sgd(p0, grad):
        # first step: buffer = g + wd * p; Nesterov: p - lr * (d + m * buffer) = p - lr (1 + m) d
        return p0 if grad is None else p0 - lr * (1 + m) * (grad + wd * p0)

    kd_mattered = 0
    for i, (p, p0, grad, ce_grad) in enumerate(zip(params, ref_params, grads, ce_grads)):
        expected = sgd(p0.detach(), grad)
        assert torch.allclose(p, expected, rtol=1e-4, atol=1e-6), \
            f'parameter {i} {tuple(p.shape)}: max error {(p - expected).abs().max():.3g}'
        if grad is not None:
            buf = main_phase.optimizer.state[p]['momentum_buffer']
            assert torch.allclose(buf, grad + wd * p0.detach(), rtol=1e-4, atol=1e-6)
        without_kd = sgd(p0.detach(), ce_grad)
        kd_mattered += not torch.allclose(without_kd, expected, rtol=1e-4, atol=1e-6)
    # the comparison can tell a step without the KD term: many parameters move differently
    assert kd_mattered > len(params) // 4, kd_mattered

    # BatchNorm statistics: one student forward in train mode, as in the reference
    for (name, b), rb in zip(model.named_buffers(), ref_model.buffers()):
        assert torch.allclose(b.float(), rb.float(), rtol=1e-5, atol=1e-6), name

    # the logged sums: CE and KD times the batch size
    assert sums[0].item() == pytest.approx(ce.item() * B, rel=1e-4)
    assert sums[1].item() == pytest.approx(kd.item() * B, rel=1e-4)
    assert sums[-1].item() == B

    # the teacher: untouched, still frozen and in eval mode
    assert not teacher.training and all(not mod.training for mod in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f'teacher {k} changed'

    if mode == 'crd':  # the banks' rows of the batch move towards the new embeddings
        mom = args.nce_mom
        for bank, ref_bank, v in ((distiller.crd.memory_s, ref_dist.crd.memory_s, v_s),
                                  (distiller.crd.memory_t, ref_dist.crd.memory_t, v_t)):
            expected = F.normalize(ref_bank[idx] * mom + v * (1 - mom), dim=1)
            assert torch.allclose(bank[idx], expected, atol=1e-5)
            others = torch.ones(N_DATA, dtype=torch.bool)
            others[idx] = False
            assert torch.equal(bank[others], ref_bank[others])


def test_a_zero_kd_weight_is_a_ce_only_step_without_the_teacher():
    args, model, teacher, distiller, main_phase, step = build('st', ['--lambda_kd', '0'])
    main_phase.begin_epoch(1)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    ref = copy.deepcopy(model)
    sums = step(Batch(x, y, torch.arange(4)))
    assert calls == [] and sums[1].item() == 0.0
    grads = torch.autograd.grad(F.cross_entropy(ref(x).out, y), list(ref.parameters()))
    for p, p0, grad in zip(model.parameters(), ref.parameters(), grads):
        assert torch.allclose(p, p0 - 0.1 * 1.9 * (grad + 1e-4 * p0), rtol=1e-4, atol=1e-6)
