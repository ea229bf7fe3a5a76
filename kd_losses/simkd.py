"""SimKD: the student classifies with the reused teacher classifier.

Chen, Mei, Zhang, Wang, Feng, Chen: "Knowledge Distillation with the Reused Teacher
Classifier", CVPR 2022, https://arxiv.org/abs/2203.14001

The last stage's post-activation maps of student and teacher are aligned in
space as the official code does: the student map is average-pooled to the
teacher's size when it is larger, the teacher map to the student's when it is
larger. A projector (1x1 conv to t/f channels, BN, ReLU; 3x3 conv, BN, ReLU;
1x1 conv to t channels, BN, ReLU; t the teacher's channels, f = simkd_factor)
maps the student map to the teacher's channels; the loss is the MSE between
the projected map and the teacher map. The student then classifies with the
teacher's classifier (a frozen copy of `teacher.head`) on the global average
of the projected map: `wrap_student` returns `SimKDStudent`, the module that
is trained, evaluated and saved as the student (the student's parameters
under their own names, plus `simkd_projector.*` and the classifier's weight
and bias as buffers `simkd_head.*`), so cross-entropy, accuracy, evaluation
and model_best.pth.tar all use the reused classifier. The projector moves
from the distiller into that wrapper: it is trained and saved with the
student (the distiller keeps no state). The projected map reaches the loss
as the `.projected` attribute of the wrapper's output (a subclass of the
feature tuple).

Defaults from the official CIFAR-100 script (DefangChen/SimKD
scripts/run_distill.sh, `-c 0 -d 0 -b 1`, factor 2): no cross-entropy
(ce_weight 0), no logit KD, MSE weight 1. The official runs use 240 epochs,
lr 0.05 (0.01 for ShuffleNet/MobileNet students), batch 64, weight decay 5e-4;
here the zoo's schedule.

Needs a teacher whose classifier reads the global average of its last stage
(the last stage's channels are the head's inputs): not MobileNetV2 or ShuffleV2
as teacher (their head reads an extra 1x1 conv after the last stage), which
raises ConfigError. Departures: the student's own classifier is still
computed (and unused); the MSE runs in float32.

Under --protocol crd (the CIFAR-100 benchmark's schedule): the same official
CIFAR-100 weights (CE weight 0, MSE weight 1, factor 2).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.base import last_stage

from .registry import ConfigError, Distiller, Flag, Method, pick, register

__all__ = ['SimKD', 'SimKDStudent']


def projector(in_ch, out_ch, factor):
    mid = out_ch // factor
    return nn.Sequential(
        nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class FrozenLinear(nn.Module):
    """A copy of a classifier whose weight and bias are buffers: saved with the
    module, never trained, never handed to an optimiser."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer('weight', linear.weight.detach().clone())
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


_PROJECTED = {}  # a named tuple of features -> its subclass that carries `.projected`


def projected_type(cls):
    if cls not in _PROJECTED:
        _PROJECTED[cls] = type(cls.__name__, (cls,), {'__module__': cls.__module__})
    return _PROJECTED[cls]


def with_projection(features, projected):
    """`features` (Features or Features4) carrying `projected`, the projector's
    output map, as an attribute: a subclass of the same named tuple."""
    out = projected_type(type(features))(*features)
    out.projected = projected
    return out


class SimKDStudent(nn.Module):
    """The student, the projector and the reused teacher classifier (frozen).

    The student's parameters and buffers are registered under their own names
    (its children are this module's children), so the state dict is the
    student's plus `simkd_projector.*` and `simkd_head.*`. forward returns the
    student's features with `out` = simkd_head(mean over space of the
    projected last-stage map) and the projected map as `.projected`."""

    def __init__(self, student, projector, head, stage, pool_to=None):
        super().__init__()
        from network import Features, Features4  # the subclasses exist before any tracing
        for cls in (Features, Features4):
            projected_type(cls)
        self.nets = (student,)  # a plain tuple: its parts are registered below, by name
        for name, child in student.named_children():
            self.add_module(name, child)
        for name, p in student.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in student.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in student._non_persistent_buffers_set)
        self.simkd_projector = projector
        self.simkd_head = head if isinstance(head, FrozenLinear) else FrozenLinear(head)
        self.stage, self.pool_to = stage, pool_to
        self.name = getattr(student, 'name', type(student).__name__)
        self.num_class = head.out_features

    @property
    def student(self):
        return self.nets[0]

    @property
    def head(self):
        return self.simkd_head

    @property
    def feature_shapes(self):
        return {**self.student.feature_shapes, 'out': (self.num_class,)}

    def train(self, mode=True):
        super().train(mode)
        self.student.train(mode)
        return self

    def forward(self, x):
        features = self.student(x)
        fm = pick(features, self.stage, 'post')
        if self.pool_to is not None:
            fm = F.adaptive_avg_pool2d(fm, self.pool_to)
        projected = self.simkd_projector(fm)
        out = self.simkd_head(projected.mean(dim=(2, 3)))
        return with_projection(features._replace(out=out), projected)


class SimKD(Distiller):
    def __init__(self, ctx, factor):
        super().__init__()
        self.s_key, self.t_key = last_stage(ctx.student_shapes), last_stage(ctx.teacher_shapes)
        s_shape, t_shape = ctx.student_shapes[self.s_key], ctx.teacher_shapes[self.t_key]
        if ctx.teacher is None:
            raise ConfigError("simkd reuses the teacher's classifier: the context must give the teacher")
        head = ctx.teacher.head
        if head.in_features != t_shape[0]:
            raise ConfigError(f'simkd: the teacher\'s classifier reads {head.in_features} features, '
                              f'not its last stage {self.t_key} {tuple(t_shape)} pooled '
                              f'(student {self.s_key} {tuple(s_shape)})')
        if t_shape[0] // factor < 1:
            raise ConfigError(f'simkd: --simkd_factor {factor} leaves the projector no channels '
                              f'({t_shape[0]} // {factor} = 0)')
        # spatial alignment (official): pool the larger map to the smaller size
        self.source_size = tuple(t_shape[1:]) if s_shape[1] > t_shape[1] else None
        self.target_size = tuple(s_shape[1:]) if s_shape[1] < t_shape[1] else None
        # Built here so that .to(device), channels-last and sync-BN reach them;
        # wrap_student moves them into the student's wrapper.
        self.projector = projector(s_shape[0], t_shape[0], factor)
        self.head = FrozenLinear(head)
        self.parts = (self.projector, self.head)

    def wrap_student(self, student):
        projector_, head = self.parts
        for name in ('projector', 'head'):  # from now on owned (trained, saved) by the wrapper
            self._modules.pop(name, None)
        return SimKDStudent(student, projector_, head, self.s_key, self.source_size)

    def project(self, s):
        """The projected student map: carried by the wrapper's output, or computed."""
        projected = getattr(s, 'projected', None)
        if projected is None:  # plain student features (not from SimKDStudent)
            fm = pick(s, self.s_key, 'post')
            if self.source_size is not None:
                fm = F.adaptive_avg_pool2d(fm, self.source_size)
            projected = self.parts[0](fm)
        return projected

    def forward(self, s, t, batch):
        target = pick(t, self.t_key, 'post').detach()
        if self.target_size is not None:
            target = F.adaptive_avg_pool2d(target, self.target_size)
        projected = self.project(s)
        with torch.autocast(projected.device.type, enabled=False):
            return F.mse_loss(projected.float(), target.float())


def build(ctx):
    return SimKD(ctx, ctx.args.simkd_factor)


register(Method(
    name='simkd', title='SimKD (reused teacher classifier)', paper='https://arxiv.org/abs/2203.14001',
    transfers="last stage post-activation through a projector, MSE; the student classifies "
              "with the teacher's frozen classifier on the projected map",
    variant='official CIFAR-100 weights (CE 0, MSE 1, factor 2) on the zoo schedule',
    build=build,
    defaults={'lambda_kd': 1.0, 'ce_weight': 0.0, 'simkd_factor': 2},
    protocol_defaults={'crd': {'ce_weight': 0.0, 'lambda_kd': 1.0, 'simkd_factor': 2}},
    flags={'simkd_factor': Flag(int, 'simkd: projector bottleneck, mid channels = teacher '
                                     'channels // factor', positive=True)},
))
