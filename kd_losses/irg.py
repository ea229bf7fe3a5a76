"""Instance relationship graph.

Liu, Cao, Li, Yuan, Hu, Li, Duan: "Knowledge Distillation via Instance
Relationship Graph", CVPR 2019,
https://openaccess.thecvf.com/content_CVPR_2019/papers/Liu_Knowledge_Distillation_via_Instance_Relationship_Graph_CVPR_2019_paper.pdf

The seed's variant, on [penultimate stage post, last stage post, feat, out]
of each network (the last two of `ctx.stage_keys`: rb2 and rb3, or rb3 and
rb4 for four-stage networks):
- vertex: MSE between the logits;
- edges: squared pairwise distances of the batch's samples (diagonal zeroed,
  divided by their max) for feat and the two stages; MSE, mean of the three;
- transformation: per sample, the squared distance between the penultimate
  stage (average-pooled to the last one's size) and the last stage (adjacent
  channels averaged in groups, pairs for the resnets, down to the
  penultimate's channel count), divided by the batch max; MSE.
Loss = w_vert * vertex + w_edge * edge + w_tran * transformation (the paper's
fixed weights, without its loss-dependent weighting); the three weighted
terms are logged on their own.

Across networks: the edges are B x B and the transformation is one number
per sample, each computed within one network, so student and teacher shapes
need not match (the logits share the classes). Within each network the last
stage's channels must be a whole multiple of the penultimate's for the
grouped average; a network where they are not (MobileNetV2: 48 and 160)
raises ConfigError naming both shapes.

Under --protocol crd: the CIFAR-100 benchmark (RepDistiller, mdistiller) has
no IRG, so its weights are the seed's (CE weight 1, lambda 1, vertex 0.1,
edge 5, transformation 5).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import gather_batch

from .registry import ConfigError, Distiller, Flag, Method, pick, register

__all__ = ['IRG']

EPS = 1e-12


def max_normalised(dist):
    # the clamp only matters when every entry is 0 (a batch of one for the edges)
    return dist / dist.amax().clamp(min=EPS)


class IRG(nn.Module):
    def __init__(self, w_vert, w_edge, w_tran):
        super().__init__()
        self.w_vert, self.w_edge, self.w_tran = w_vert, w_edge, w_tran

    @staticmethod
    def edges(x):
        """[B, B] squared distances between the batch's flattened samples, max-normalised."""
        x = x.flatten(1)
        sq_norm = x.pow(2).sum(dim=1)
        sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * x @ x.t()).clamp(min=EPS)
        off_diagonal = 1 - torch.eye(len(x), device=x.device, dtype=x.dtype)
        return max_normalised(sq_dist * off_diagonal)

    @staticmethod
    def transformation(fm_early, fm_late):
        """[B] squared distance between an earlier map and a later one, max-normalised."""
        if fm_early.shape[2:] != fm_late.shape[2:]:
            fm_early = F.adaptive_avg_pool2d(fm_early, fm_late.shape[2:])
        c_early, c_late = fm_early.size(1), fm_late.size(1)
        if c_late != c_early:
            if c_late % c_early:
                raise ValueError(f'IRG transformation: {c_late} channels cannot be averaged '
                                 f'in groups down to {c_early}')
            # adjacent channels averaged: (0, 1), (2, 3), ... when c_late == 2 * c_early
            fm_late = fm_late.unflatten(1, (c_early, c_late // c_early)).mean(dim=2)
        sq_dist = (fm_early - fm_late).flatten(1).pow(2).sum(dim=1).clamp(min=EPS)
        return max_normalised(sq_dist)

    def terms(self, irg_s, irg_t):
        """The weighted terms {'vertex', 'edge', 'transformation'}; their sum is the loss."""
        fm2_s, fm3_s, feat_s, out_s = [x.float() for x in irg_s]
        fm2_t, fm3_t, feat_t, out_t = [x.float() for x in irg_t]
        vertex = F.mse_loss(out_s, out_t)
        edge = sum(F.mse_loss(self.edges(s), self.edges(t))
                   for s, t in ((feat_s, feat_t), (fm2_s, fm2_t), (fm3_s, fm3_t))) / 3
        tran = F.mse_loss(self.transformation(fm2_s, fm3_s), self.transformation(fm2_t, fm3_t))
        return {'vertex': self.w_vert * vertex, 'edge': self.w_edge * edge,
                'transformation': self.w_tran * tran}

    def forward(self, irg_s, irg_t):
        parts = self.terms(irg_s, irg_t)
        return parts['vertex'] + parts['edge'] + parts['transformation']


class IRGDistiller(Distiller):
    """Feeds IRG the lists [penultimate stage post, last stage post, feat,
    out] (rb2, rb3 for the resnets); teacher parts
    detached. Its graph relates the samples of a batch, so under torchrun it
    is built on the global batch. Returns the three weighted terms, each
    logged (train_kd_vertex, train_kd_edge, train_kd_transformation)."""

    loss_terms = ('vertex', 'edge', 'transformation')

    def __init__(self, loss, keys=('rb2', 'rb3')):
        super().__init__()
        self.irg = loss
        self.early, self.late = keys  # the penultimate and the last stage

    def graph_inputs(self, features):
        return [pick(features, self.early, 'post'), pick(features, self.late, 'post'),
                features.feat, features.out]

    def forward(self, s, t, batch):
        return self.irg.terms([gather_batch(x, differentiable=True) for x in self.graph_inputs(s)],
                              [gather_batch(x.detach()) for x in self.graph_inputs(t)])


def build(ctx):
    a = ctx.args
    if min(a.w_irg_vert, a.w_irg_edge, a.w_irg_tran) < 0:
        raise ConfigError('irg: --w_irg_vert, --w_irg_edge and --w_irg_tran must be >= 0')
    early, late = ctx.stage_keys('irg')[-2:]
    for who, shapes in (('student', ctx.student_shapes), ('teacher', ctx.teacher_shapes)):
        if shapes[late][0] % shapes[early][0]:
            raise ConfigError(f'irg: the {who} {late} {tuple(shapes[late])} cannot be averaged down '
                              f'to {early} {tuple(shapes[early])} channels for the transformation '
                              'term')
    return IRGDistiller(IRG(a.w_irg_vert, a.w_irg_edge, a.w_irg_tran), (early, late))


register(Method(
    name='irg', title='instance relationship graph',
    paper='https://openaccess.thecvf.com/content_CVPR_2019/papers/Liu_Knowledge_Distillation_via_Instance_Relationship_Graph_CVPR_2019_paper.pdf',
    transfers='last two stages post-activation, feat and logits; vertices, edges, transformation',
    variant='one-to-one mode only',
    build=build,
    defaults={'lambda_kd': 1.0, 'w_irg_vert': 0.1, 'w_irg_edge': 5.0, 'w_irg_tran': 5.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'w_irg_vert': 0.1,
                               'w_irg_edge': 5.0, 'w_irg_tran': 5.0}},
    flags={'w_irg_vert': Flag(float, 'weight of the IRG vertex (logit) term'),
           'w_irg_edge': Flag(float, 'weight of the IRG edge term'),
           'w_irg_tran': Flag(float, 'weight of the IRG transformation term')},
))
