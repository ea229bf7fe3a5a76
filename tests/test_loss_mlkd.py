"""MLKD (kd_losses/mlkd.py): its three terms against an independent float64
computation of the official formulas (masks from numpy's percentile), hand
cases for the masks and for the official reduction's quirks, one two-view
training step against SGD on the loss written out here, the mode's schedule
defaults, and training through train_kd.py with a bitwise resume."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_kd
from conftest import assert_same_run, distill_argv, stop_after_first_epoch_then_resume
from dataset import TwoViewBatch
from kd_losses import METHODS
from kd_losses.mlkd import MLKD, masked_fractions, median


# ----------------------------------------------------------------------------- the reference

def softmax64(z):
    z = z.double()
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def standardised(z):
    z = z.double()
    mean = z.sum(dim=1, keepdim=True) / z.shape[1]
    std = torch.sqrt(((z - mean) ** 2).sum(dim=1, keepdim=True) / (z.shape[1] - 1))
    return (z - mean) / (std + 1e-7)


def kd_term(s, t, T):
    p_t, p_s = softmax64(t / T), softmax64(s / T)
    return T * T * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1).mean()


def cc_term(s, t, T):
    p_t, p_s = softmax64(t / T), softmax64(s / T)
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / s.shape[1]


def bc_term(s, t, T):
    p_t, p_s = softmax64(t / T), softmax64(s / T)
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / s.shape[0]


def fractions(t_weak):
    """Masked fractions with numpy's median (np.percentile 50, as the official code)."""
    p = softmax64(t_weak).detach().numpy()
    conf, per_class = p.max(axis=1), p.sum(axis=0)
    return (conf <= np.percentile(conf, 50)).mean(), (per_class <= np.percentile(per_class, 50)).mean()


def reference(sw, ss, tw, ts, T, stand=False):
    """{'instance', 'class', 'batch'} as KD_ours.forward_train adds them up."""
    m, c = fractions(tw)
    zs_w, zt_w = (standardised(sw), standardised(tw)) if stand else (sw, tw)
    zs_s, zt_s = (standardised(ss), standardised(ts)) if stand else (ss, ts)
    temps = [T, 3.0, 5.0, 2.0, 6.0]
    instance = (m * sum(kd_term(zs_w, zt_w, u) for u in temps)
                + kd_term(zs_s, zt_s, T) + kd_term(zs_s, zt_s, 3.0) + kd_term(zs_s, zt_s, 5.0)
                + kd_term(zs_w, zt_w, 2.0) + kd_term(zs_w, zt_w, 6.0))
    return {'instance': instance,
            'class': c * sum(cc_term(sw, tw, u) for u in temps),
            'batch': m * sum(bc_term(sw, tw, u) for u in temps)}


def logits(seed, b=10, c=7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, generator=g, dtype=torch.float64) * scale for _ in range(4)]


@pytest.mark.parametrize('T, stand, b', [(4.0, False, 10), (2.0, True, 9), (1.5, False, 1 + 2)])
def test_terms_equal_the_float64_reference(T, stand, b):
    z = logits(b, b=b)
    got = MLKD(T, logit_stand=stand).terms(*z)
    expected = reference(*z, T, stand)
    for name in ('instance', 'class', 'batch'):
        assert got[name].dtype == torch.float64
        assert torch.allclose(got[name], expected[name], rtol=1e-10, atol=1e-12), name
    # float32 logits (the step's): float32 terms, close to the reference
    got32 = MLKD(T, logit_stand=stand).terms(*(x.float() for x in z))
    for name in expected:
        assert got32[name].dtype == torch.float32
        assert torch.allclose(got32[name].double(), expected[name], rtol=2e-4, atol=1e-6), name
    assert torch.allclose(MLKD(T, stand)(*z), sum(expected.values()), rtol=1e-10)


def confident_rows(tops, c=5):
    """Teacher logits (log-probabilities) whose softmax rows have these top probabilities."""
    rows = [[np.log(q)] + [np.log((1 - q) / (c - 1))] * (c - 1) for q in tops]
    return torch.tensor(rows, dtype=torch.float64)


def test_sample_mask_hand_cases():
    # even batch, distinct confidences: the median lies between the middle two: half counted
    assert masked_fractions(confident_rows([0.9, 0.3, 0.6, 0.5]))[0] == 0.5
    # odd batch: the median is the middle one, counted too
    assert masked_fractions(confident_rows([0.9, 0.3, 0.6, 0.5, 0.7]))[0] == pytest.approx(3 / 5)
    # a tie at the median: both counted (<=)
    assert masked_fractions(confident_rows([0.9, 0.6, 0.6, 0.3]))[0] == pytest.approx(3 / 4)
    # every sample alike: all counted
    assert masked_fractions(confident_rows([0.4] * 6))[0] == 1.0


def test_class_mask_hand_cases():
    # two samples' probabilities; class sums 0.8, 0.7, 0.3, 0.2: median 0.5, two classes below
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]], dtype=torch.float64)
    assert masked_fractions(p.log())[1] == 0.5
    # five classes, sums 0.9, 0.5, 0.3, 0.2, 0.1: the middle one (0.3) and those below
    p = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05], [0.4, 0.2, 0.2, 0.15, 0.05]], dtype=torch.float64)
    assert masked_fractions(p.log())[1] == pytest.approx(3 / 5)


def test_median_is_numpys_50th_percentile():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 8, 9, 64):
        x = torch.rand(n, generator=g, dtype=torch.float64)
        assert median(x).item() == pytest.approx(np.percentile(x.numpy(), 50), rel=1e-15)
    assert median(torch.tensor([3.0, 1.0, 3.0, 2.0])).item() == 2.5
    assert median(torch.tensor([0.2, 0.7, 0.7, 0.9])).item() == pytest.approx(0.7)


def test_masks_never_leave_the_device():
    """On the meta device any host read (.item(), numpy) would raise."""
    samples, classes = masked_fractions(torch.randn(6, 10, device='meta'))
    assert samples.device.type == 'meta' and samples.shape == () and classes.shape == ()


def test_official_reduction_quirks():
    sw, ss, tw, ts = logits(7)
    loss = MLKD(4.0)
    # a student equal to the teacher on the weak view: the class and batch terms vanish, and
    # the instance term keeps only the strong view's T, 3 and 5 (its 2 and 6 read the weak view)
    got = loss.terms(tw, ss, tw, ts)
    assert got['class'] == 0 and got['batch'] == 0
    strong = sum(kd_term(ss, ts, u) for u in (4.0, 3.0, 5.0))
    assert torch.allclose(got['instance'], strong, rtol=1e-10)
    # the strong view reaches the instance term only: its class- and batch-level terms are not added
    other = loss.terms(sw, ss + torch.randn_like(ss), tw, ts)
    base = loss.terms(sw, ss, tw, ts)
    assert other['class'] == base['class'] and other['batch'] == base['batch']
    assert other['instance'] != base['instance']
    # the masks scale whole terms: a batch of 10 distinct confidences counts half
    m, _ = fractions(tw)
    assert m == 0.5
    weak_only = loss.terms(sw, ts, tw, ts)['instance']   # the strong view's own terms vanish
    expected = 0.5 * sum(kd_term(sw, tw, u) for u in (4.0, 3.0, 5.0, 2.0, 6.0)) \
        + kd_term(sw, tw, 2.0) + kd_term(sw, tw, 6.0)
    assert torch.allclose(weak_only, expected, rtol=1e-10)


# ----------------------------------------------------------------------------- the step

B, N_DATA = 8, 64


def build(extra=()):
    argv = ['--data_name', 'cifar10', '--s_name', 'resnet20', '--t_name', 'resnet20',
            '--s_init', 'unused', '--t_model', 'unused', '--kd_mode', 'mlkd', '--device', 'cpu',
            '--epochs', '4', *extra]
    args, sources, _ = train_kd.parse_args(argv)
    torch.manual_seed(0)
    built = train_kd.build_distillation(args, torch.device('cpu'), N_DATA, torch.arange(N_DATA) % 10,
                                        load_weights=False)
    return args, sources, built


def test_one_two_view_step_is_sgd_on_ce_of_both_views_plus_lambda_mlkd():
    args, _, (model, teacher, distiller, _, main_phase, step) = build()
    main_phase.begin_epoch(1)
    assert (args.ce_weight, args.lambda_kd, args.T) == (0.1, 0.9, 4.0)
    g = torch.Generator().manual_seed(1)
    weak, strong = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    ref_model, ref_teacher = copy.deepcopy(model), copy.deepcopy(teacher)
    calls = []
    teacher.register_forward_hook(lambda module, inputs, out: calls.append(inputs[0].shape[0]))
    sums = step(TwoViewBatch(weak, y, torch.arange(B), strong))
    assert calls == [2 * B]  # the teacher once, on both views

    s_w, s_s = ref_model(weak), ref_model(strong)  # the student once per view, in train mode
    with torch.no_grad():
        t_w, t_s = ref_teacher(weak).out, ref_teacher(strong).out
    ce = F.cross_entropy(s_w.out, y) + F.cross_entropy(s_s.out, y)
    terms = reference(s_w.out, s_s.out, t_w, t_s, args.T)
    kd = sum(terms.values()).float()
    loss = args.ce_weight * ce + args.lambda_kd * kd
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    grads = torch.autograd.grad(loss, ref_params, retain_graph=True)
    ce_grads = torch.autograd.grad(args.ce_weight * ce, ref_params)
    lr, m, wd = args.lr, args.momentum, args.weight_decay
    kd_mattered = 0
    for i, (p, p0, grad, ce_grad) in enumerate(zip(params, ref_params, grads, ce_grads)):
        expected = p0.detach() - lr * (1 + m) * (grad + wd * p0.detach())   # first Nesterov step
        assert torch.allclose(p, expected, rtol=1e-4, atol=1e-6), f'parameter {i}'
        without_kd = p0.detach() - lr * (1 + m) * (ce_grad + wd * p0.detach())
        kd_mattered += not torch.allclose(p, without_kd, rtol=1e-4, atol=1e-6)
    assert kd_mattered > len(params) // 4, kd_mattered   # the comparison can tell the KD term
    for (name, b), rb in zip(model.named_buffers(), ref_model.buffers()):  # BN: two forwards
        assert torch.allclose(b.float(), rb.float(), rtol=1e-5, atol=1e-6), name
    # logged: CE of both views, the KD sum and its terms, the weak view's accuracy
    assert sums[0].item() == pytest.approx(ce.item() * B, rel=1e-4)
    assert sums[1].item() == pytest.approx(kd.item() * B, rel=1e-4)
    for k, name in enumerate(('instance', 'class', 'batch')):
        assert sums[2 + k].item() == pytest.approx(terms[name].item() * B, rel=1e-4, abs=1e-7)
    correct = (s_w.out.argmax(1) == y).sum().item()
    assert sums[step.stat_names.index('correct1')].item() == correct


def test_schedule_defaults_under_protocol_crd():
    args, sources, _ = build(['--protocol', 'crd'])
    assert args.lr == 0.025 and sources['lr'] == 'default for mlkd under --protocol crd'
    assert (args.epochs, args.batch_size, args.weight_decay) == (4, 64, 5e-4)
    assert (args.ce_weight, args.lambda_kd, args.T) == (0.1, 0.9, 4.0)
    args, sources, _ = build(['--protocol', 'crd', '--lr', '0.02'])
    assert args.lr == 0.02 and sources['lr'] == 'command line'
    # the seed protocol and other modes keep their schedule
    assert build()[0].lr == 0.1
    st, _, _ = train_kd.parse_args(['--data_name', 'cifar100', '--s_name', 'resnet20', '--t_name',
                                    'resnet56', '--s_init', 'x', '--t_model', 'x', '--kd_mode', 'st',
                                    '--device', 'cpu', '--protocol', 'crd'])
    assert st.lr == 0.05
    # a small student keeps the benchmark's lr 0.01, as the official per-pair configs
    small, sources, _ = train_kd.parse_args(['--data_name', 'cifar100', '--s_name', 'MobileNetV2',
                                             '--t_name', 'vgg13', '--s_init', 'x', '--t_model', 'x',
                                             '--kd_mode', 'mlkd', '--device', 'cpu', '--protocol', 'crd'])
    assert small.lr == 0.01 and 'MobileNetV2' in sources['lr']
    # the logit-standardisation authors' setting with the switch
    on, _, _ = build(['--logit_stand'])
    assert (on.T, on.lambda_kd, on.ce_weight) == (2.0, 9.0, 0.1)


def test_mlkd_trains_and_resumes_bitwise(base_run, tmp_path, monkeypatch):
    def argv(note):
        return distill_argv(base_run, tmp_path, note, 'mlkd', 2, 50, ['--seed', '3', '--lr', '0.025'])
    train_kd.main(argv('straight'))
    stop_after_first_epoch_then_resume(monkeypatch, argv('resumed'))
    assert_same_run(str(tmp_path / 'straight'), str(tmp_path / 'resumed'))
    with open(os.path.join(tmp_path, 'straight', 'log.txt')) as f:
        log = f.read()
    assert 'views: weak' in log and 'strong' in log
    assert 'train_kd_instance' in open(os.path.join(tmp_path, 'straight', 'metrics.csv')).readline()
    assert METHODS['mlkd'].views == ('weak', 'strong')


def test_a_zero_kd_weight_trains_on_ce_of_both_views_without_the_teacher():
    args, _, (model, teacher, distiller, _, main_phase, step) = build(['--lambda_kd', '0'])
    main_phase.begin_epoch(1)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(2)
    weak, strong = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    ref = copy.deepcopy(model)
    sums = step(TwoViewBatch(weak, y, torch.arange(4), strong))
    assert calls == [] and sums[1].item() == 0.0
    ce = F.cross_entropy(ref(weak).out, y) + F.cross_entropy(ref(strong).out, y)
    grads = torch.autograd.grad(args.ce_weight * ce, list(ref.parameters()))
    for p, p0, grad in zip(model.parameters(), ref.parameters(), grads):
        assert torch.allclose(p, p0 - 0.1 * 1.9 * (grad + 1e-4 * p0), rtol=1e-4, atol=1e-6)


def test_dot_with_equal_momenta_is_sgd_on_the_two_view_step():
    """--optimizer dot hands the two-view step's CE and KD gradients over apart;
    with --dot_delta 0 its two momenta are equal and the step is SGD's (later
    steps: tests/test_dot.py, on the optimiser alone, where float32 rounding
    of MLKD's large gradients cannot amplify through BatchNorm)."""
    g = torch.Generator().manual_seed(3)
    batches = [TwoViewBatch(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g),
                            torch.arange(4), torch.randn(4, 3, 32, 32, generator=g))]
    models = []
    for extra in (['--optimizer', 'dot', '--dot_delta', '0'], ['--no-nesterov']):
        _, _, (model, _, _, _, main_phase, step) = build(extra)
        main_phase.begin_epoch(1)
        for batch in batches:
            step(batch)
        models.append(model)
        if extra[0] == '--optimizer':   # the distillation gradient went to its own buffers
            assert step.optimizer.kd_started.item() == 1
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
