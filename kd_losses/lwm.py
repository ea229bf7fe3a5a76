"""Learning without Memorizing: Grad-CAM attention distillation.

Dhar, Singh, Peng, Wu, Chellappa: "Learning without Memorizing", CVPR 2019,
https://arxiv.org/abs/1811.08051

LwM is an incremental-learning method; as in the seed only its attention
distillation term is kept. A Grad-CAM-like map is taken at the penultimate
stage's post-activation (the one before the last of `ctx.stage_keys`: rb2
of the resnets' three, rb3 of four): the gradient of the target logit
w.r.t. the map, channel weights = its spatial mean, CAM = ReLU(sum_c w_c *
grad_c). The seed's variant weights the gradient itself, not the activations
as Grad-CAM does. The CAMs are flattened and L2-normalised; the loss is the
L1 distance (mean over entries) with the teacher's CAM detached. The
student's CAM keeps its graph (create_graph), so the loss trains the student
through second derivatives.

Across networks: each CAM sums over its own network's channels, so channel
counts need not match; where the two maps differ in spatial size the larger
CAM is adaptively average-pooled to the smaller's size before its
normalisation (the paper compares CAMs of one architecture; this is the
natural extension, and equal sizes are compared as they are).

Under --protocol crd: the CIFAR-100 benchmark (RepDistiller, mdistiller) has
no LwM, so its weights are the seed's (CE weight 1, lambda 0.4).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Distiller, Method, pick, register

__all__ = ['LwM']


def grad_cam(out, fm, target, create_graph, size=None):
    """[B, H*W] L2-normalised CAM from the gradient of the target logit w.r.t.
    `fm`; with `size` (h, w) other than the map's, the CAM is adaptively
    average-pooled to it before the normalisation."""
    if not fm.requires_grad or not out.requires_grad:
        raise ValueError('lwm needs logits computed under autograd from the feature map')
    score = out.gather(1, target.view(-1, 1)).sum()
    # Teacher side (create_graph=False): its graph is freed once used.
    grad, = torch.autograd.grad(score, fm, create_graph=create_graph)
    grad = grad.float()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * grad).sum(dim=1))
    if size is not None and tuple(cam.shape[1:]) != tuple(size):
        cam = F.adaptive_avg_pool2d(cam.unsqueeze(1), size).squeeze(1)
    return F.normalize(cam.flatten(1), p=2, dim=1)


class LwM(nn.Module):
    def forward(self, out_s, fm_s, out_t, fm_t, target):
        size = tuple(min(a, b) for a, b in zip(fm_s.shape[2:], fm_t.shape[2:]))  # the smaller map's
        cam_t = grad_cam(out_t, fm_t, target, create_graph=False, size=size)
        cam_s = grad_cam(out_s, fm_s, target, create_graph=True, size=size)
        return F.l1_loss(cam_s, cam_t.detach())


class LwMDistiller(Distiller):
    teacher_grad = True  # the teacher's CAM needs its gradient w.r.t. the map

    def __init__(self, key='rb2'):
        super().__init__()
        self.loss = LwM()
        self.key = key

    def forward(self, s, t, batch):
        return self.loss(s.out, pick(s, self.key, 'post'), t.out, pick(t, self.key, 'post'),
                         batch.target)


register(Method(
    name='lwm', title='learning without memorizing (Grad-CAM attention distillation)',
    paper='https://arxiv.org/abs/1811.08051',
    transfers='logits + penultimate stage post-activation: gradient-weighted CAM, L2-normalised, L1',
    variant='Grad-CAM at the penultimate stage (rb2 of three); the channel weights multiply the '
            'gradient, not the activations',
    build=lambda ctx: LwMDistiller(ctx.stage_keys('lwm')[-2]),
    defaults={'lambda_kd': 0.4},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 0.4}},
))
