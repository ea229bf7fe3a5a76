"""Every registered method on the 13 teacher -> student pairs of the CIFAR-100
benchmark (RepDistiller / mdistiller), whose features differ in channels,
spatial size and stage count.

Each method is built through the registry as train_kd.build_distillation
builds it: the flags a `--protocol crd` run resolves, a `Context` with the
real networks and their `feature_shapes`. It either refuses the pair with a
ConfigError whose message names the shapes in question, or runs one forward
and backward step (CPU, batch 3, 100 classes) in which the loss is finite,
reaches the student, and every learnable connector gets a gradient; so do
the connectors of its pre-training phases, through their own losses.

Methods that only read features get random tensors shaped like the
networks' outputs (no network forward, so the 13 pairs stay cheap). The ones
that run the networks themselves (bss, sobolev, lwm, simkd) are built on the
13 pairs and run on one small real pair whose shapes differ (ShuffleV1 ->
resnet8: 960 vs 64 channels and 4x4 vs 8x8 maps at the last stage, 8x8 vs
16x16 at the penultimate one; the student is the cheap one, since sobolev and
lwm differentiate its gradients again).
"""
import copy
import functools
import re
import tempfile

import pytest
import torch
import torch.nn.functional as F

import train_kd
from dataset import Batch, TwoViewBatch
from kd_losses import METHODS, ConfigError, Context
from network import Features, Features4, build_network

BENCHMARK_PAIRS = [
    ('resnet56', 'resnet20'), ('resnet110', 'resnet20'), ('resnet110', 'resnet32'),
    ('resnet32x4', 'resnet8x4'), ('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('vgg13', 'vgg8'),
    ('vgg13', 'MobileNetV2'), ('ResNet50', 'MobileNetV2'), ('ResNet50', 'vgg8'),
    ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2'), ('wrn_40_2', 'ShuffleV1')]
# Methods that run the networks again (attacks, input gradients, Grad-CAM, the
# teacher's classifier on the student's map): random features cannot stand in.
RUN_NETWORKS = ('bss', 'lwm', 'simkd', 'sobolev')
SMALL_PAIR = ('ShuffleV1', 'resnet8')  # teacher, student
# A batch of 3: relations within a batch of 2 are degenerate (RKD's one
# distance, divided by the mean distance, is always 1: no gradient).
BATCH, NUM_CLASS, N_DATA = 3, 100, 1000
# Above this many parameters of its own, a method is built on the meta device
# only, its step skipped: semckd with a ResNet50 teacher (some 850M: regressors
# to 2048 channels) or a vgg13 one (some 95M), ft with a ResNet50 teacher (some
# 145M: a paraphraser on 2048 channels). Their steps would take most of this
# file's time; other pairs exercise the same code on smaller maps.
MAX_PARAMETERS = 50_000_000


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Batches of 3 gain little from a second thread, and on a shared machine
    its spinning costs several times the work; the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def network(name, role):
    """One real network per name and role, shared by every test: a teacher in
    eval mode without gradients, as train_kd.py holds it; a student in train mode."""
    torch.manual_seed(0)
    net = build_network(name, NUM_CLASS)
    return net.eval().requires_grad_(False) if role == 'teacher' else net.train()


@functools.lru_cache(maxsize=None)
def crd_args(mode, *extra):
    """The flags a `--protocol crd` run of `mode` resolves, with `extra` ones given."""
    args, _, _ = train_kd.parse_args([
        '--data_name', 'cifar100', '--protocol', 'crd', '--t_name', 'resnet56', '--s_name', 'resnet20',
        '--kd_mode', mode, '--s_init', '-', '--t_model', '-', '--device', 'cpu',
        '--save_root', tempfile.gettempdir(), *extra])
    return args


def resolved_args(mode):
    return crd_args(mode, '--nce_n', '64')  # few CRD negatives: the test's split is small


def context(mode, teacher_name, student_name):
    student, teacher = network(student_name, 'student'), network(teacher_name, 'teacher')
    args = copy.copy(resolved_args(mode))
    args.t_name, args.s_name = teacher_name, student_name
    return Context(args=args, student_shapes=student.feature_shapes,
                   teacher_shapes=teacher.feature_shapes, num_class=NUM_CLASS, n_data=N_DATA,
                   train_labels=torch.arange(N_DATA) % NUM_CLASS, device=torch.device('cpu'),
                   student=student, teacher=teacher)


def random_features(shapes, seed, requires_grad=False):
    """Features (or Features4) with the per-sample `shapes`: pre-activations
    normal, post = relu(pre); with requires_grad, every pre-activation, feat
    and out is a leaf collecting gradients."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for key, shape in shapes.items():
        x = torch.randn((BATCH, *shape), generator=g).requires_grad_(requires_grad)
        values.append(x if key in ('feat', 'out') else (x, torch.relu(x)))
    return (Features4 if 'rb4' in shapes else Features)(*values)


def leaves(features):
    return [v[0] if isinstance(v, tuple) else v for v in features]


def batch_of(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(BATCH, 3, 32, 32, generator=g), torch.tensor([3, 7, 42])[:BATCH],
                 torch.tensor([5, 11, 900])[:BATCH])


def total(kd):
    return sum(kd.values()) if isinstance(kd, dict) else kd


def shapes_named(message, ctx):
    """The feature shapes of either network that `message` spells out."""
    shapes = {tuple(s) for s in (*ctx.student_shapes.values(), *ctx.teacher_shapes.values())}
    return {s for s in shapes if str(s) in message}


def build_or_refusal(mode, ctx, device='cpu'):
    """((distiller, pretrain phases, trained model), None), or (None, the
    ConfigError's message): the calls of train_kd.build_distillation, the
    method's own modules on `device` ('meta': shapes without memory)."""
    try:
        with torch.device(device):
            distiller = METHODS[mode].build(ctx)
            pretrain = distiller.pretrain_phases(ctx)
            model = distiller.wrap_student(ctx.student)
    except ConfigError as e:
        return None, str(e)
    return (distiller, pretrain, model), None


def assert_gradients(params, what):
    for p in params:
        assert p.grad is not None, f'{what}: a parameter of shape {tuple(p.shape)} got no gradient'
        assert torch.isfinite(p.grad).all(), what
    # a connector as a whole learns (single entries may sit behind a dead ReLU)
    assert not params or sum(float(p.grad.abs().sum()) for p in params) > 0, what


def clear_gradients(module):
    for p in module.parameters():
        p.grad = None


PAIR_IDS = [f'{t}-{s}' for t, s in BENCHMARK_PAIRS]


@pytest.mark.parametrize('teacher_name, student_name', BENCHMARK_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize('mode', sorted(METHODS))
def test_builds_and_steps_or_refuses_with_the_shapes(mode, teacher_name, student_name):
    ctx = context(mode, teacher_name, student_name)
    built, refusal = build_or_refusal(mode, ctx, 'meta')  # first without memory
    if refusal is not None:
        assert '\n' not in refusal, refusal
        assert len(shapes_named(refusal, ctx)) >= 2, refusal
        return
    if mode in RUN_NETWORKS:  # run on real networks: test_network_running_methods_on_a_small_pair
        return
    size = sum(p.numel() for p in built[0].parameters())
    if size > MAX_PARAMETERS:  # it builds; a step would take most of this file's time
        return
    distiller, pretrain, model = build_or_refusal(mode, ctx)[0]
    assert not distiller.teacher_grad and model is ctx.student, \
        f'{mode} runs the networks: add it to RUN_NETWORKS'
    torch.manual_seed(0)
    s = random_features(ctx.student_shapes, seed=1, requires_grad=True)
    t = random_features(ctx.teacher_shapes, seed=2)
    batch = batch_of()
    student_leaves = leaves
    if METHODS[mode].views == ('weak', 'strong'):  # (weak, strong) pairs and the strong view
        s = (s, random_features(ctx.student_shapes, seed=4, requires_grad=True))
        t = (t, random_features(ctx.teacher_shapes, seed=5))
        batch = TwoViewBatch(*batch, batch.img.flip(0))

        def student_leaves(pair):
            return leaves(pair[0]) + leaves(pair[1])

    # the main phase, at an epoch past every warm-up and ramp (AB and FSP use
    # their loss in the initialisation phase only: below)
    distiller.train()
    epoch = ctx.args.epochs // 2
    distiller.begin_epoch(epoch, ctx.args.epochs)
    if distiller.kd_weight(epoch, ctx.args.epochs) > 0:
        kd = total(distiller(s, t, batch))
        assert kd.dim() == 0 and torch.isfinite(kd), f'{mode}: {kd}'
        kd.backward()
        assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in student_leaves(s)), \
            f'{mode}: the loss does not reach the student'
        assert_gradients(list(distiller.learnable_parameters()), f'{mode} main phase')

    # pre-training phases train the distiller's own parts (connectors, paraphraser)
    own = {id(p) for p in distiller.parameters()}
    for phase in pretrain:
        clear_gradients(distiller)
        distiller.eval()
        for m in phase.train_modules:
            m.train()
        s = random_features(ctx.student_shapes, seed=3, requires_grad=True)
        loss = phase.loss(s if phase.needs_student else None, t, batch)
        assert torch.isfinite(loss), f'{mode} {phase.name}: {loss}'
        loss.backward()
        if phase.needs_student:
            assert any(x.grad is not None and x.grad.abs().sum() > 0 for x in leaves(s)), \
                f'{mode} {phase.name}: the loss does not reach the student'
        assert_gradients([p for p in phase.params if id(p) in own], f'{mode} {phase.name} phase')
    clear_gradients(distiller)


@pytest.fixture(scope='module')
def small_pair():
    torch.manual_seed(0)
    return (build_network(SMALL_PAIR[0], NUM_CLASS).eval().requires_grad_(False),
            build_network(SMALL_PAIR[1], NUM_CLASS).train())


@pytest.mark.parametrize('mode', RUN_NETWORKS)
def test_network_running_methods_on_a_small_pair(mode, small_pair):
    """One step as train_kd.KDStep.distill takes it, on real networks whose
    shapes differ."""
    teacher, student = small_pair
    for key in ('rb2', 'rb3'):
        assert student.feature_shapes[key][0] != teacher.feature_shapes[key][0]
        assert student.feature_shapes[key][1:] != teacher.feature_shapes[key][1:]
    args = copy.copy(resolved_args(mode))
    args.t_name, args.s_name = SMALL_PAIR
    ctx = Context(args=args, student_shapes=student.feature_shapes,
                  teacher_shapes=teacher.feature_shapes, num_class=NUM_CLASS, n_data=N_DATA,
                  train_labels=torch.arange(N_DATA) % NUM_CLASS, device=torch.device('cpu'),
                  student=student, teacher=teacher)
    distiller = METHODS[mode].build(ctx)
    distiller.pretrain_phases(ctx)
    model = distiller.wrap_student(student)
    distiller.train()
    distiller.begin_epoch(args.epochs // 2, args.epochs)
    torch.manual_seed(0)
    batch = batch_of(1)
    img = batch.img
    if distiller.teacher_grad:
        img = img.detach().requires_grad_(True)
        batch = batch._replace(img=img)
    s = model(img)
    with torch.set_grad_enabled(distiller.teacher_grad):
        t = teacher(img)
    kd = total(distiller(s, t, batch))
    assert kd.dim() == 0 and torch.isfinite(kd), f'{mode}: {kd}'
    loss = F.cross_entropy(s.out, batch.target) + kd
    clear_gradients(model)
    loss.backward()
    # the student learns (simkd leaves its own classifier unused), and so does
    # every part the method adds to it (simkd's projector) or keeps itself
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    own = {id(p) for p in student.parameters()}
    assert_gradients([p for p in model.parameters() if id(p) not in own], f'{mode} added to the student')
    assert_gradients(list(distiller.learnable_parameters()), f'{mode} connectors')
    assert all(p.grad is None for p in teacher.parameters())


def test_the_stage_literals_are_gone():
    """Methods pair the stages both networks have (ctx.stage_keys), never a
    hard-coded rb1..rb3."""
    import inspect
    import kd_losses
    for mode in ('ab', 'afd', 'at', 'fitnet', 'fsp', 'ft', 'irg', 'lwm', 'nst', 'ofd', 'sp', 'vid'):
        source = inspect.getsource(getattr(kd_losses, mode))
        code = re.sub(r'""".*?"""', '', source, flags=re.S)  # docstrings may name the stages
        assert "('rb1', 'rb2', 'rb3')" not in code and "['rb1', 'rb2', 'rb3']" not in code, mode
        assert 'stage_keys' in code, mode


# ----------------------------------------------------------------------------- the benchmark's weights

# Under --protocol crd, as a run resolves them (240 epochs): the benchmark's CE
# weight (its -r, gamma) and loss weight (its -b, beta; -a for KD), each
# module's docstring giving the source (RepDistiller scripts/run_cifar_distill.sh
# and train_student.py; mdistiller engine/cfg.py and configs/cifar100/; the
# newer methods' official CIFAR-100 configurations), or, where the benchmark's
# weight multiplies another formula or the method is not in it, why not.
CRD_PROTOCOL = {
    'st': {'ce_weight': 0.1, 'lambda_kd': 0.9, 'T': 4.0},
    'crd': {'ce_weight': 1.0, 'lambda_kd': 0.8, 'nce_t': 0.07, 'nce_n': 16384, 'feat_dim': 128,
            'nce_mom': 0.5, 'mode': 'exact'},
    'fitnet': {'ce_weight': 1.0, 'lambda_kd': 100.0},
    'at': {'ce_weight': 1.0, 'lambda_kd': 1000.0, 'p': 2.0},
    'sp': {'ce_weight': 1.0, 'lambda_kd': 3000.0},
    'cc': {'ce_weight': 1.0, 'lambda_kd': 100.0},   # the benchmark's 0.02 weighs another loss
    'vid': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'sf': 1.0, 'init_var': 5.0},
    'rkd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'w_dist': 25.0, 'w_angle': 50.0},
    'pkt': {'ce_weight': 1.0, 'lambda_kd': 30000.0},
    'ab': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'm': 1.0, 'init_epochs': 30},
    'ft': {'ce_weight': 1.0, 'lambda_kd': 200.0, 'k': 0.5, 'para_epochs': 30},
    'fsp': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'init_epochs': 30},  # its -b 50 weighs a zero term
    'nst': {'ce_weight': 1.0, 'lambda_kd': 50.0},
    'kdsvd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'svd_k': 1},
    'ofd': {'ce_weight': 1.0, 'lambda_kd': 0.5},   # mdistiller's 0.001 weighs per-sample sums
    # not in the benchmark: the seed's weights
    'logits': {'ce_weight': 1.0, 'lambda_kd': 0.1},
    'afd': {'ce_weight': 1.0, 'lambda_kd': 500.0},
    'bss': {'ce_weight': 1.0, 'lambda_kd': 2.0, 'T': 3.0, 'attack_size': 32, 'warmup_epochs': 12},
    'irg': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'w_irg_vert': 0.1, 'w_irg_edge': 5.0,
            'w_irg_tran': 5.0},
    'lwm': {'ce_weight': 1.0, 'lambda_kd': 0.4},
    'sobolev': {'ce_weight': 1.0, 'lambda_kd': 20.0},
    # the newer methods: their official CIFAR-100 configurations
    # (crd_args' pair resnet56 -> resnet20 has its own official beta: mdistiller
    # configs/cifar100/dkd/res56_res20.yaml, BETA 2.0)
    'dkd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'dkd_alpha': 1.0, 'dkd_beta': 2.0, 'T': 4.0,
            'dkd_warmup': 20},
    'dist': {'ce_weight': 1.0, 'lambda_kd': 2.0, 'dist_beta': 1.0, 'dist_gamma': 1.0, 'T': 4.0},
    'nkd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'T': 3.0, 'nkd_gamma': 3.5},
    'wttm': {'ce_weight': 1.0, 'lambda_kd': 4.0, 'wttm_gamma': 0.2},
    'ctkd': {'ce_weight': 0.1, 'lambda_kd': 0.9, 'ctkd_t_min': 1.0, 'ctkd_t_range': 20.0,
             'ctkd_ramp_epochs': 10, 'ctkd_lambda_max': 1.0},
    # (resnet56 -> resnet20's own weight: ReviewKD CIFAR-100/script/reviewKD.sh, --kd-loss-weight 0.6)
    'reviewkd': {'ce_weight': 1.0, 'lambda_kd': 0.6, 'reviewkd_warmup': 20},
    'simkd': {'ce_weight': 0.0, 'lambda_kd': 1.0, 'simkd_factor': 2},
    'srrl': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'srrl_alpha': 1.0, 'srrl_beta': 1.0},
    'semckd': {'ce_weight': 1.0, 'lambda_kd': 400.0},
    'catkd': {'ce_weight': 1.0, 'lambda_kd': 0.7, 'cat_resolution': 2, 'cat_normalize': False},
    'ickd': {'ce_weight': 1.0, 'lambda_kd': 2.5},
}


def test_every_method_has_the_benchmarks_weights():
    assert set(CRD_PROTOCOL) <= set(METHODS)
    missing = [m for m in METHODS if 'crd' not in METHODS[m].protocol_defaults]
    assert not missing, f'no --protocol crd defaults: {missing}'


@pytest.mark.parametrize('mode', sorted(CRD_PROTOCOL))
def test_protocol_crd_resolves_the_benchmarks_weights(mode):
    args = crd_args(mode)
    assert args.epochs == 240
    got = {name: getattr(args, name) for name in CRD_PROTOCOL[mode]}
    assert got == CRD_PROTOCOL[mode]


def test_pretraining_epochs_scale_with_a_shorter_benchmark_run():
    """30 of the benchmark's 240 epochs: 15 of 120."""
    for mode, name in (('ab', 'init_epochs'), ('fsp', 'init_epochs'), ('ft', 'para_epochs')):
        assert getattr(crd_args(mode, '--epochs', '120'), name) == 15


def test_logit_standardisation_keeps_its_authors_setting_under_the_benchmark():
    args = crd_args('st', '--logit_stand')
    # logit-standardization-KD mdistiller/engine/cfg.py lines 62-65: T 2, CE_WEIGHT 0.1, KD_WEIGHT 9
    assert (args.ce_weight, args.lambda_kd, args.T) == (0.1, 9.0, 2.0)
