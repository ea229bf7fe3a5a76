"""Sobolev training (input-gradient matching).

Czarnecki, Osindero, Jaderberg, Swirszcz, Pascanu: "Sobolev Training for
Neural Networks", NIPS 2017, https://arxiv.org/abs/1706.04859
(as a distillation loss, also Srinivas, Fleuret: "Knowledge Transfer with
Jacobian Matching", ICML 2018, https://arxiv.org/abs/1803.00443)

The seed's variant matches one Jacobian row only: the gradient of the
target-class logit with respect to the input image, for the student (kept
differentiable, create_graph) and the teacher (detached). Both are flattened
and L2-normalised per sample; the loss is their MSE. Both gradients have the
input image's shape, so any student and teacher pair.

Under --protocol crd: the CIFAR-100 benchmark (RepDistiller, mdistiller) has
no Sobolev/Jacobian matching, so its weights are the seed's (CE weight 1,
lambda 20).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Distiller, Method, register

__all__ = ['Sobolev']


def target_logit_gradient(out, inputs, target, create_graph):
    """Gradient of the summed target logits w.r.t. `inputs`, flattened and
    L2-normalised per sample. As in the seed one backward serves the whole
    batch: row i is d out[i, target[i]] / d inputs[i] when samples are
    independent (eval-mode BN); train-mode BN adds its cross-sample terms."""
    if not inputs.requires_grad or not out.requires_grad:
        raise ValueError('input-gradient losses need outputs computed under autograd from '
                         'inputs that require grad')
    score = out.gather(1, target.view(-1, 1)).sum()
    # Teacher side (create_graph=False): its graph is freed here, so its
    # activations do not live on until the student's backward.
    grad, = torch.autograd.grad(score, inputs, create_graph=create_graph)
    return F.normalize(grad.flatten(1).float(), p=2, dim=1)


class Sobolev(nn.Module):
    def forward(self, out_s, out_t, img, target):
        grad_t = target_logit_gradient(out_t, img, target, create_graph=False)
        grad_s = target_logit_gradient(out_s, img, target, create_graph=True)
        return F.mse_loss(grad_s, grad_t.detach())


class SobolevDistiller(Distiller):
    teacher_grad = True  # the teacher's input gradient is needed

    def __init__(self):
        super().__init__()
        self.loss = Sobolev()

    def forward(self, s, t, batch):
        return self.loss(s.out, t.out, batch.img, batch.target)


register(Method(
    name='sobolev', title='Sobolev training (input-gradient matching)',
    paper='https://arxiv.org/abs/1706.04859',
    transfers='gradient of the target logit w.r.t. the input image, L2-normalised, MSE',
    variant='gradient of the target-class logit only, L2-normalised',
    build=lambda ctx: SobolevDistiller(),
    defaults={'lambda_kd': 20.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 20.0}},
))
