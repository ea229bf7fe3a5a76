"""Boundary supporting samples.

Heo, Lee, Yun, Choi: "Knowledge Distillation with Adversarial Samples
Supporting Decision Boundary", AAAI 2019, https://arxiv.org/abs/1805.05532

Each step, samples that both nets classify correctly are pushed by an
iterative attack on the teacher towards another class, and the student
matches the teacher's softened outputs on those boundary samples:
KL(softmax(t/T) || softmax(s/T)), batch mean, no T^2 factor (the seed's
variant). The seed's selection, attack-class draw and attack are kept:

- selection: if more than `attack_size` samples qualify, keep those with the
  largest non-target squared softmax difference between teacher and student;
- attack class: drawn per sample from the teacher's classes other than its
  top-1, with probability proportional to the teacher's softmax;
- attack: 10 steps of 0.3 along the input gradient of
  (softmax_attack - softmax_target) / its norm, scaled by
  (softmax_target - softmax_attack + 1e-4), only while the teacher still
  predicts the target; images clamped to [-2.5, 2.5].

Schedule (seed): no KD for the first `warmup_epochs` epochs, then the weight
1 - 5/4 (epoch-1)/epochs floored at 0, so the last 20% of epochs are CE only.

Without host syncs, `min(attack_size, batch)` samples are always attacked:
the best qualifying ones first, padded with non-qualifying ones that stay
unmoved and are masked out of the loss (zero qualifying samples: loss 0).
The seed's student sees only the qualifying samples, so its BatchNorm batch
statistics differ from ours in the (rare) steps where padding is needed.
Under torchrun each process attacks up to attack_size / processes samples of
its own slice: close to one process's choice, not identical.

Only logits are compared, so any teacher and student with the same classes
pair (no connector; shapes of the features play no part).

Under --protocol crd: the CIFAR-100 benchmark (RepDistiller, mdistiller) has
no BSS, so its settings are the seed's (CE weight 1, lambda 2, T 3, attack
size 32, 10 warm-up epochs of 200, scaled with --epochs).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import WORLD

from .registry import ConfigError, Distiller, Flag, Method, register

__all__ = ['BSS']


class BSS(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, attacked_out_s, attacked_out_t, valid=None):
        """Batch-mean KL; with a bool mask `valid`, the mean over valid rows (0 if none)."""
        log_p_s = F.log_softmax(attacked_out_s.float() / self.T, dim=1)
        log_p_t = F.log_softmax(attacked_out_t.float() / self.T, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        if valid is None:
            return kl.mean()
        kl = torch.where(valid, kl, torch.zeros_like(kl))  # where, not *: a masked NaN stays out
        return kl.sum() / valid.sum().clamp(min=1)


def select_samples(out_s, out_t, target, k):
    """Indices of k samples to attack and a mask of those that qualify.

    Qualifying: both nets predict the target. Among them, the largest
    non-target squared softmax differences come first; non-qualifying samples
    only fill the k slots (fixed size: no host sync)."""
    out_s, out_t = out_s.detach().float(), out_t.detach().float()
    correct = (out_s.argmax(dim=1) == target) & (out_t.argmax(dim=1) == target)
    diff = (out_t.softmax(dim=1) - out_s.softmax(dim=1)).pow(2)
    score = diff.sum(dim=1) - diff.gather(1, target.view(-1, 1)).squeeze(1)  # >= 0
    idx = score.masked_fill(~correct, -1.0).topk(k).indices
    return idx, correct[idx]


def draw_attack_class(out_t):
    """Per row, a class other than the top-1 one, drawn with probability
    proportional to softmax(out_t).

    Softmax renormalised over the allowed classes (in log space, so it never
    underflows to an all-zero row), sampled with the Gumbel-max trick: the
    same distribution as torch.multinomial, which would sync to validate it."""
    logits = out_t.detach().float()
    top1 = logits.argmax(dim=1, keepdim=True)
    is_top1 = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top1, True)
    log_p = F.log_softmax(logits.masked_fill(is_top1, float('-inf')), dim=1)
    gumbel = -torch.empty_like(log_p).exponential_().log()
    return (log_p + gumbel).masked_fill(is_top1, float('-inf')).argmax(dim=1)


def attack(teacher, img, target, attack_class, active, steps=10, step_size=0.3, eps=1e-4,
           bound=2.5):
    """The seed's iterative attack on the (eval-mode) teacher; rows with
    active False are returned unchanged. Only the images are differentiated,
    so the teacher's parameters collect no .grad."""
    x = img.detach().clone()
    moving = active.view(-1, 1, 1, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            out = teacher(x).out.float()
            prob = out.softmax(dim=1)
            p_target = prob.gather(1, target.view(-1, 1)).squeeze(1)
            p_attack = prob.gather(1, attack_class.view(-1, 1)).squeeze(1)
            grad, = torch.autograd.grad((p_attack - p_target).sum(), x)
        with torch.no_grad():
            # the seed stops moving a sample once the teacher no longer predicts its target
            still_correct = (out.argmax(dim=1) == target) & active
            norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12)  # a zero gradient: no step
            scale = step_size * still_correct * (p_target - p_attack + eps) / norm
            x = torch.where(moving, (x + scale.view(-1, 1, 1, 1) * grad).clamp(-bound, bound), x)
    return x.detach()


class BSSDistiller(Distiller):
    def __init__(self, student, teacher, T, attack_size, warmup_epochs):
        super().__init__()
        self.loss = BSS(T)
        self.attack_size, self.warmup_epochs = attack_size, warmup_epochs
        # A plain tuple: the networks are used, not owned (not parameters, not in state_dict).
        self.nets = (student, teacher)

    def kd_weight(self, epoch, epochs):
        if epoch <= self.warmup_epochs:
            return 0.0
        return max(0.0, 1.0 - 5.0 / 4.0 * (epoch - 1) / epochs)

    def forward(self, s, t, batch):
        student, teacher = self.nets
        img, target = batch.img, batch.target
        # under torchrun each process attacks its share of the global attack_size
        share = -(-self.attack_size // WORLD.size)
        idx, valid = select_samples(s.out, t.out, target, min(share, len(target)))
        target = target[idx]
        attack_class = draw_attack_class(t.out[idx])
        attacked = attack(teacher, img[idx], target, attack_class, valid)
        attacked_out_s = student(attacked).out  # student in its current (train) mode
        with torch.no_grad():
            attacked_out_t = teacher(attacked).out
        return self.loss(attacked_out_s, attacked_out_t, valid)


def build(ctx):
    if ctx.student is None or ctx.teacher is None:
        raise ConfigError('bss runs the networks on attacked images: the context must '
                          'give the student and the teacher')
    if ctx.args.warmup_epochs < 0:
        raise ConfigError(f'bss: --warmup_epochs must be >= 0, got {ctx.args.warmup_epochs}')
    return BSSDistiller(ctx.student, ctx.teacher, ctx.args.T, ctx.args.attack_size,
                        ctx.args.warmup_epochs)


register(Method(
    name='bss', title='boundary supporting samples', paper='https://arxiv.org/abs/1805.05532',
    transfers='logits on adversarial samples near the decision boundary, KL at temperature T',
    variant='KL without the T^2 factor; 10 warm-up epochs; CE only in the last 20% of epochs',
    build=build,
    defaults={'lambda_kd': 2.0, 'T': 3.0, 'attack_size': 32, 'warmup_epochs': 10},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 2.0, 'T': 3.0, 'attack_size': 32,
                               'warmup_epochs': 12}},  # the seed's 10 of 200, of the benchmark's 240
    flags={'T': Flag(float, 'softmax temperature', positive=True),
           'attack_size': Flag(int, 'bss: most samples attacked per batch', positive=True),
           'warmup_epochs': Flag(int, 'bss: first epochs without the KD term', epochs_of=200,
                                 warms_up='the KD term')},
))
