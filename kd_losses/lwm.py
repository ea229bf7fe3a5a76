"""Learning without Memorizing: Grad-CAM attention distillation.

Dhar, Singh, Peng, Wu, Chellappa: "Learning without Memorizing", CVPR 2019,
https://arxiv.org/abs/1811.08051

LwM is an incremental-learning method; as in the seed only its attention
distillation term is kept. A Grad-CAM-like map is taken at `rb2` post: the
gradient of the target logit w.r.t. the map, channel weights = its spatial
mean, CAM = ReLU(sum_c w_c * grad_c). The seed's variant weights the
gradient itself, not the activations as Grad-CAM does. The CAMs are
flattened and L2-normalised; the loss is the L1 distance (mean over entries)
with the teacher's CAM detached. The student's CAM keeps its graph
(create_graph), so the loss trains the student through second derivatives.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import Distiller, Method, register

__all__ = ['LwM']


def grad_cam(out, fm, target, create_graph):
    """[B, H*W] L2-normalised CAM from the gradient of the target logit w.r.t. `fm`."""
    if not fm.requires_grad or not out.requires_grad:
        raise ValueError('lwm needs logits computed under autograd from the feature map')
    score = out.gather(1, target.view(-1, 1)).sum()
    # Teacher side (create_graph=False): its graph is freed once used.
    grad, = torch.autograd.grad(score, fm, create_graph=create_graph)
    grad = grad.float()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * grad).sum(dim=1)).flatten(1)
    return F.normalize(cam, p=2, dim=1)


class LwM(nn.Module):
    def forward(self, out_s, fm_s, out_t, fm_t, target):
        cam_t = grad_cam(out_t, fm_t, target, create_graph=False)
        cam_s = grad_cam(out_s, fm_s, target, create_graph=True)
        return F.l1_loss(cam_s, cam_t.detach())


class LwMDistiller(Distiller):
    teacher_grad = True  # the teacher's CAM needs its gradient w.r.t. rb2

    def __init__(self):
        super().__init__()
        self.loss = LwM()

    def forward(self, s, t, batch):
        return self.loss(s.out, s.rb2[1], t.out, t.rb2[1], batch.target)


register(Method(
    name='lwm', title='learning without memorizing (Grad-CAM attention distillation)',
    paper='https://arxiv.org/abs/1811.08051',
    transfers='logits + rb2 post-activation: gradient-weighted CAM, L2-normalised, L1',
    variant='Grad-CAM at rb2 (not rb3); the channel weights multiply the gradient, not the activations',
    build=lambda ctx: LwMDistiller(),
    defaults={'lambda_kd': 0.4},
))
