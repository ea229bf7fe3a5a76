"""Knowledge distillation with singular value decomposition (KDSVD).

Lee, Kim, Song: "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018, https://arxiv.org/abs/1807.06819
(official TensorFlow code: sseung0703/SSKD_SVD, nets/Distillation.py)

Each stage's map [B, C, H, W] is read as a [B, HW, C] matrix per sample and
decomposed, X = U S V^T. Its leading right singular vectors (columns of V,
in channel space) are the knowledge:

1. SVD: the first k + 1 right singular vectors of student and teacher.
2. Alignment, per stage, to the teacher's first k vectors: each teacher
   vector takes the student vector (of the k + 1) with the largest
   |cosine|; both are scaled by the teacher's first k singular values
   normalised to unit L2 norm; the teacher vector's sign is flipped where
   its cosine with the student's is negative.
3. Relations between consecutive stages l, l+1: for every channel pair
   (c, c') and vector j, exp(-(v_l[c, j] - v_{l+1}[c', j])^2 / 8), for
   student and teacher alike ([B, C_l, C_{l+1}, k]).
4. Loss: sum over stage pairs of sqrt(k)/2 * sum (rbf_s - rbf_t)^2, divided
   by the batch size.

It reads the post-activation maps of every stage both nets have
(rb1..rb3, or rb1..rb4); the channel counts of student and teacher must
match stage by stage (the vectors are compared channel by channel), the
spatial sizes need not.

Defaults: k = 1 and loss weight 1, as the official code (num_DFV=1, its
CIFAR-100 VGG experiment) and mdistiller's port (engine/cfg.py: KDSVD.K 1,
FEAT_WEIGHT 1, CE weight 1); the same on CIFAR-10.

Departures from the official code:
- batch mean (the official sums over the batch), and the loss enters as
  ce_weight * CE + lambda_kd * KD: the official multi-task update (the KD
  gradient of the convolutional layers clipped to the CE gradient's norm and
  ramped by sigmoid(epoch - 2)) is not reproduced;
- the SVD's gradient is the exact one. The official code overrides it with
  a version restricted to the 5 leading singular triplets whose coupling
  term is always zero (its non-finite guard sees the infinite diagonal of
  1 / (s_i^2 - s_j^2) and zeroes the whole matrix), so maps with at least as
  many positions as channels (every stage of the CIFAR resnets) would get no
  gradient at all. Here pairs of singular values that both lie beyond the
  k + 1 used ones are left out of the coupling (their term is zero exactly),
  so repeated zero singular values of rank-deficient maps give no 0/0; a
  sample whose gradient is still not finite (two used singular values
  equal) gets 0, as in the official guard;
- no NaN masking of the singular vectors (a finite input gives finite ones).

torch.linalg.svd waits for the device on CUDA (it checks for convergence on
the host): one synchronisation per stage and network each step.

Under --protocol crd (the CIFAR-100 benchmark): CE weight 1, KDSVD weight 1,
k 1 (RepDistiller `--distill kdsvd -a 0 -b 1`, its README's setting;
mdistiller engine/cfg.py KDSVD: K 1, CE_WEIGHT 1, FEAT_WEIGHT 1).
"""
import math

import torch
import torch.nn as nn

from .registry import ConfigError, Distiller, Flag, Method, pick, register

__all__ = ['KDSVD', 'right_singular_vectors']


class _RightSingularVectors(torch.autograd.Function):
    """(V[:, :, :m], S[:, :m]) of a batch of [R, C] matrices; S carries no gradient."""

    @staticmethod
    def forward(ctx, x, m):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.mT
        ctx.save_for_backward(u, s, v)
        ctx.m = m
        s_m = s[:, :m].clone()
        ctx.mark_non_differentiable(s_m)
        return v[:, :, :m].clone(), s_m

    @staticmethod
    def backward(ctx, grad_v, _grad_s):
        u, s, v = ctx.saved_tensors
        m = ctx.m
        b, c, k = v.shape
        g = grad_v.new_zeros(b, c, k)
        g[:, :, :m] = grad_v
        vtg = v.mT @ g
        skew = vtg - vtg.mT
        s2 = s * s
        gap = s2.unsqueeze(1) - s2.unsqueeze(2)              # [i, j] = s_j^2 - s_i^2
        idx = torch.arange(k, device=s.device)
        used = (idx.view(-1, 1) < m) | (idx.view(1, -1) < m)  # pairs whose term can be non-zero
        couple = used & (idx.view(-1, 1) != idx.view(1, -1))
        inv_gap = torch.where(couple, 1.0 / torch.where(couple, gap, torch.ones_like(gap)),
                              torch.zeros_like(gap))
        grad = u @ (s.unsqueeze(2) * inv_gap * skew) @ v.mT
        if u.shape[1] < c:  # wide: V spans only part of channel space
            y = (grad_v / s[:, None, :m]).mT                   # S_m^-1 gV^T, [B, m, C]
            grad = grad + u[:, :, :m] @ (y - (y @ v) @ v.mT)
        finite = torch.isfinite(grad).flatten(1).all(dim=1)
        return torch.where(finite.view(-1, 1, 1), grad, torch.zeros_like(grad)), None


def right_singular_vectors(fm, m):
    """The first m right singular vectors [B, C, m] and singular values [B, m]
    of each sample's map [B, C, H, W] read as a [B, HW, C] matrix (float32)."""
    x = fm.float().flatten(2).mT
    return _RightSingularVectors.apply(x, m)


def align(v_s, v_t, s_t, n):
    """Student vectors matched to the teacher's first n, both scaled by the
    teacher's normalised singular values, the teacher's signs matched."""
    v_t, w = v_t[:, :, :n], s_t[:, :n]
    w = (w / w.norm(dim=1, keepdim=True)).unsqueeze(1)
    best = (v_s.mT @ v_t).abs().argmax(dim=1)                 # [B, n]: student vector per teacher one
    v_s = v_s.gather(2, best.unsqueeze(1).expand(-1, v_s.shape[1], -1)) * w
    v_t = v_t * w
    sign = torch.where((v_s.detach() * v_t).sum(dim=1, keepdim=True) >= 0, 1.0, -1.0)
    return v_s, v_t * sign


def rbf(v_top, v_bottom):
    """[B, C_top, C_bottom, n]: exp(-(v_top[c] - v_bottom[c'])^2 / 8) per vector."""
    return torch.exp(-(v_top.unsqueeze(2) - v_bottom.unsqueeze(1)).pow(2) / 8)


class KDSVD(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, fms_s, fms_t):
        if len(fms_s) != len(fms_t) or len(fms_s) < 2:
            raise ValueError('KDSVD compares consecutive stages: give two maps or more per net, '
                             'as many for student as teacher')
        with torch.autocast(fms_s[0].device.type, enabled=False):
            student, teacher = [], []
            for fm_s, fm_t in zip(fms_s, fms_t):
                if fm_s.shape[1] != fm_t.shape[1]:
                    raise ValueError(f'KDSVD: student and teacher maps differ in channels '
                                     f'({fm_s.shape[1]} vs {fm_t.shape[1]})')
                student.append(right_singular_vectors(fm_s, self.components(fm_s)))
                with torch.no_grad():
                    teacher.append(right_singular_vectors(fm_t, self.components(fm_t)))
            total = 0.0
            for l in range(len(fms_s) - 1):
                (vs_a, _), (vs_b, _) = student[l], student[l + 1]
                (vt_a, st_a), (vt_b, st_b) = teacher[l], teacher[l + 1]
                n = min(self.k, vs_a.shape[2], vs_b.shape[2], vt_a.shape[2], vt_b.shape[2])
                vs_a, vt_a = align(vs_a, vt_a, st_a, n)
                vs_b, vt_b = align(vs_b, vt_b, st_b, n)
                diff = rbf(vs_a, vs_b) - rbf(vt_a, vt_b)
                total = total + 0.5 * math.sqrt(n) * diff.pow(2).sum()
            return total / fms_s[0].shape[0]

    def components(self, fm):
        """How many singular vectors a map gives: k + 1, at most its rank bound."""
        return min(self.k + 1, fm.shape[1], fm.shape[2] * fm.shape[3])


class KDSVDDistiller(Distiller):
    # torch.linalg.svd checks its result on the host: --compile runs this step eagerly
    capturable = False

    def __init__(self, loss, keys):
        super().__init__()
        self.kdsvd, self.keys = loss, tuple(keys)

    def forward(self, s, t, batch):
        return self.kdsvd([pick(s, key, 'post') for key in self.keys],
                          [pick(t, key, 'post').detach() for key in self.keys])


def build(ctx):
    keys = ctx.stage_keys('kdsvd')
    if len(keys) < 2:
        raise ConfigError('kdsvd relates consecutive stages: the networks need two stages or more')
    for key in keys:
        c_s, c_t = ctx.student_shapes[key][0], ctx.teacher_shapes[key][0]
        if c_s != c_t:
            raise ConfigError(f'kdsvd compares singular vectors channel by channel, but the '
                              f'student {key} is {ctx.student_shapes[key]} and the teacher\'s '
                              f'{ctx.teacher_shapes[key]}')
    if ctx.args.svd_k < 1:
        raise ConfigError(f'kdsvd: --svd_k must be >= 1, got {ctx.args.svd_k}')
    return KDSVDDistiller(KDSVD(ctx.args.svd_k), keys)


register(Method(
    name='kdsvd', title='knowledge distillation with singular value decomposition',
    paper='https://arxiv.org/abs/1807.06819',
    transfers='rb stages post-activation: leading right singular vectors, RBF relations between '
              'consecutive stages',
    variant='batch mean; exact SVD gradient; without the official clipped multi-task update',
    build=build,
    defaults={'lambda_kd': 1.0, 'svd_k': 1},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'svd_k': 1}},
    flags={'svd_k': Flag(int, 'kdsvd: singular vectors compared per stage', positive=True)},
))
