"""How train_kd.py applies each distillation method: the contract a method
file fulfils (written out for authors in kd_losses/README.md).

A method is one module in kd_losses/ holding its loss (an nn.Module callable
on bare tensors) and one `register(Method(...))` call describing how the
training loop uses it:

- `build(ctx)` returns a `Distiller`: the module that reads the student's and
  the teacher's features for a batch and returns the KD loss (before
  lambda_kd). Its parameters (connectors, embeddings, ...) are optimised with
  the student; its buffers (memory banks) are checkpointed with it.
- `defaults` are the method's hyperparameters (`lambda_kd` and the method's
  flags); `dataset_defaults` override them per dataset, `protocol_defaults`
  per --protocol, `pair_defaults` per teacher:student pair under --protocol
  crd (the official per-pair configs, each with its source), and
  `switch_defaults` when an on/off flag of the method is on. A setting left
  out on the command line takes, in this order of precedence:
  switch_defaults > pair_defaults > protocol_defaults > dataset_defaults >
  defaults (`Method.resolve`); the command line wins over all of them.
- `flags` declares the command-line flags the method reads. A flag shared by
  several methods (e.g. `--T`) must mean the same everywhere: the registry
  refuses a second declaration with another type, choices or help text; the
  chosen method's default applies when the flag is not given.

A method can also declare a second, strongly augmented view of every image
(`views=('weak', 'strong')`: its loader computes it, its step runs student
and teacher on both) and its own values of schedule flags under a protocol
(`schedule_defaults`, e.g. MLKD's lr, and a pair's own schedule in its
PairSetting, e.g. MLKD's 480 epochs for vgg13 -> MobileNetV2).

A Distiller can also ask for pre-training phases (`pretrain_phases`), a
per-epoch weight schedule (`kd_weight`), per-epoch state (`begin_epoch`),
a differentiable teacher (`teacher_grad`), a student that classifies through
another head (`wrap_student`), and named loss terms logged on their own
(`loss_terms`).

Nothing here builds a network or imports the training loop (`register`
reads the network names, to check the pairs of `pair_defaults`).
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from distributed import gather_batch


class ConfigError(ValueError):
    """A method's settings cannot work (e.g. more negatives than samples); the message says why."""


@dataclass(frozen=True)
class Flag:
    type: Callable   # float, int, str, or bool (an on/off switch: --name / --no-name)
    help: str
    choices: Optional[Tuple] = None
    positive: bool = False  # reject values <= 0
    # A number of epochs whose default is meant for a schedule of `epochs_of`
    # epochs (a protocol's own default: for that protocol's schedule): left
    # out, it scales with --epochs (rounded, at least 1 unless 0).
    epochs_of: Optional[int] = None
    # A number of epochs that is a stage of the run (shown in the log's
    # schedule, with a warning where it spans half of --epochs or more):
    # `warms_up` names what reaches full strength only after that many
    # main-schedule epochs (e.g. 'the KD weight'); `phase` names the
    # pre-training phase that lasts that many epochs (e.g. 'init').
    warms_up: Optional[str] = None
    phase: Optional[str] = None

    def scaled(self, default, epochs, reference=None):
        """The default for a run of `epochs` epochs, the default being meant
        for `reference` epochs (`epochs_of` unless given)."""
        if self.epochs_of is None or default == 0:
            return default
        return max(1, round(default * epochs / (reference or self.epochs_of)))


@dataclass(frozen=True)
class PairSetting:
    """The authors' setting for one teacher -> student pair: values of the
    method's flags (e.g. {'dkd_beta': 2.0}), where they come from (repository
    and file, e.g. 'mdistiller configs/cifar100/dkd/res56_res20.yaml'), and
    values of schedule flags where the pair's official run has a schedule of
    its own (e.g. {'epochs': 480, 'lr_decay_epochs': [150, 180, 210]}:
    MLKD's small students; see Method.schedule)."""
    values: Mapping[str, Any]
    source: str
    schedule: Mapping[str, Any] = field(default_factory=dict)


# The protocol under which `pair_defaults` apply: the CIFAR-100 benchmark, whose
# pairs the official per-pair configs are written for.
PAIR_PROTOCOL = 'crd'


@dataclass(frozen=True)
class Default:
    """A setting's default and where it comes from: `level` is 'method',
    'dataset', 'protocol', 'pair' or 'switch' (see Method.resolve), `where`
    says it in words for the log."""
    value: Any
    level: str
    where: str


@dataclass(frozen=True)
class Method:
    name: str                               # the --kd_mode value
    title: str                              # what it is, e.g. 'attention transfer'
    paper: str                              # link to the paper
    transfers: str                          # what it reads, e.g. 'rb1..3 post-activation, mean'
    build: Callable[['Context'], 'Distiller']
    defaults: Mapping[str, Any]             # seed defaults: lambda_kd and the method's flags
    flags: Mapping[str, Flag] = field(default_factory=dict)
    dataset_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variant: str = ''                       # where this implementation departs from the paper
    # Per --protocol (e.g. 'crd': the CIFAR-100 benchmark's loss weights), over the others.
    protocol_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Defaults that hold when an on/off flag of the method is on, e.g.
    # {'logit_stand': {'T': 2.0, 'lambda_kd': 9.0}}: the paper's settings for the switch.
    switch_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The official per-pair configs, keyed 'teacher:student' (network.NETWORKS
    # names): applied under --protocol crd only, over protocol_defaults.
    pair_defaults: Mapping[str, PairSetting] = field(default_factory=dict)
    # Per --protocol, the method's own values of schedule flags left out (e.g.
    # {'crd': {'lr': 0.025}}: MLKD's official lr), over the protocol's; the
    # protocol's lower lr for its small students (flags.CRD_SMALL_LR_NETS)
    # still applies. A pair's PairSetting.schedule goes over both (see
    # `schedule`). The log names the method (and the pair's source) as theirs.
    schedule_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The views of each training image the method's step reads: ('weak',), the
    # crop and flip of every mode; ('weak', 'strong') adds the strong view
    # (strong_augment.py), which only such a mode's loader computes. A two-view
    # Distiller gets (weak, strong) pairs of features (see Distiller).
    views: Tuple[str, ...] = ('weak',)

    def defaults_for(self, data_name, protocol='seed'):
        """Every setting's default on `data_name` under `protocol`: the common
        ones, the method's, the dataset's, the protocol's."""
        return {**COMMON_DEFAULTS, **self.defaults, **self.dataset_defaults.get(data_name, {}),
                **self.protocol_defaults.get(protocol, {})}

    def pair_setting(self, protocol, teacher, student):
        """The PairSetting of teacher -> student under `protocol`, or None."""
        if protocol != PAIR_PROTOCOL:
            return None
        return self.pair_defaults.get(f'{teacher}:{student}')

    def schedule(self, protocol, teacher=None, student=None, small_lr_students=(), given=None):
        """{schedule flag: Default} that the method sets for teacher -> student
        under `protocol`, for the flags not in `given` (those the command line
        sets): its `schedule_defaults` (without their lr for a student in
        `small_lr_students`, which keeps the protocol's own lower lr), then
        the pair's PairSetting.schedule over them (under --protocol crd).
        `given` maps those flags to their values. A pair's lr decays belong
        to its length: where `given` sets another --epochs, they do not apply
        (the protocol scales its own decays to the run)."""
        given = given or {}
        where = f'default for {self.name} under --protocol {protocol}'
        values = dict(self.schedule_defaults.get(protocol, {}))
        if student in small_lr_students:
            values.pop('lr', None)
        out = {name: Default(value, 'protocol', where) for name, value in values.items()}
        pair = self.pair_setting(protocol, teacher, student)
        if pair is not None:
            pair_where = f'{where} for {teacher}->{student} ({pair.source})'
            other_length = given.get('epochs', pair.schedule.get('epochs')) != pair.schedule.get('epochs')
            out.update({name: Default(value, 'pair', pair_where) for name, value in pair.schedule.items()
                        if not (other_length and name == 'lr_decay_epochs')})
        return {name: default for name, default in out.items() if name not in given}

    def resolve(self, data_name, protocol='seed', teacher=None, student=None, given=()):
        """{setting: Default} for every setting the method reads, on
        `data_name` under `protocol` for teacher -> student, `given` being the
        settings the command line sets (with their values: a switch given
        there decides whether its switch_defaults hold). Precedence, lowest
        first: the method's defaults (and the common ones), the dataset's,
        the protocol's, the pair's (under --protocol crd), the switch's; the
        settings in `given` are left to the caller (they win)."""
        given = dict(given)
        where = f'default for {self.name} on {data_name}'
        out = {name: Default(value, 'method', where) for name, value in
               {**COMMON_DEFAULTS, **self.defaults}.items()}
        out.update({name: Default(value, 'dataset', where)
                    for name, value in self.dataset_defaults.get(data_name, {}).items()})
        out.update({name: Default(value, 'protocol', f'{where} under --protocol {protocol}')
                    for name, value in self.protocol_defaults.get(protocol, {}).items()})
        pair = self.pair_setting(protocol, teacher, student)
        if pair is not None:
            out.update({name: Default(value, 'pair', f'{where} under --protocol {protocol} for '
                                                     f'{teacher}->{student} ({pair.source})')
                        for name, value in pair.values.items()})
        for switch, settings in self.switch_defaults.items():
            if given.get(switch, out[switch].value):
                out.update({name: Default(value, 'switch', f'default for {self.name} with --{switch}')
                            for name, value in settings.items()})
        return out


METHODS: Dict[str, Method] = {}


# Flags every method has (the loss weights); a method may give its own defaults.
COMMON_DEFAULTS = {'ce_weight': 1.0}


def register(method):
    """Add a method; refuses a second method of the same name and a flag that
    another method declares with a different meaning (type, choices, help)."""
    if method.name in METHODS:
        raise ValueError(f'kd_mode {method.name!r} is registered twice')
    missing = [k for k in method.flags if k not in method.defaults]
    if 'lambda_kd' not in method.defaults or missing:
        raise ValueError(f'{method.name}: defaults must give lambda_kd and every flag ({missing})')
    check_pairs(method)
    given = [k for d in (method.defaults, *method.dataset_defaults.values(),
                         *method.protocol_defaults.values(), *method.switch_defaults.values(),
                         *(p.values for p in method.pair_defaults.values())) for k in d]
    switches = [k for k in method.switch_defaults
                if k not in method.flags or method.flags[k].type is not bool]
    if switches:
        raise ValueError(f'{method.name}: switch_defaults for flags that are not on/off switches {switches}')
    if method.views not in (('weak',), ('weak', 'strong')):
        raise ValueError(f"{method.name}: views must be ('weak',) or ('weak', 'strong'), not {method.views}")
    unknown = [k for k in given if k not in method.flags and k != 'lambda_kd' and k not in COMMON_DEFAULTS]
    if unknown:
        raise ValueError(f'{method.name}: defaults for undeclared flags {unknown}')
    for name, flag in method.flags.items():
        for other in METHODS.values():
            if name in other.flags and other.flags[name] != flag:
                raise ValueError(f'{method.name}: flag --{name} is declared by {other.name} with '
                                 f'another meaning ({other.flags[name]} vs {flag}); give it a '
                                 f'method-specific name')
    METHODS[method.name] = method
    return method


def check_pairs(method):
    """Refuses a pair_defaults key that is not 'teacher:student' of known
    network names, and a PairSetting without values or source."""
    if not method.pair_defaults:
        return
    from network import NETWORKS  # the names only; nothing is built
    for key, setting in method.pair_defaults.items():
        nets = key.split(':') if isinstance(key, str) else ()
        if len(nets) != 2 or any(n not in NETWORKS for n in nets):
            raise ValueError(f'{method.name}: pair_defaults key {key!r} is not TEACHER:STUDENT of '
                             f'known networks ({" ".join(NETWORKS)})')
        if not isinstance(setting, PairSetting) or not (setting.values or setting.schedule) \
                or not setting.source:
            raise ValueError(f'{method.name}: pair_defaults[{key!r}] must be a PairSetting with '
                             f'values (or a schedule) and a source')
        if 'lr_decay_epochs' in setting.schedule and 'epochs' not in setting.schedule:
            raise ValueError(f'{method.name}: pair_defaults[{key!r}] gives lr decays without the '
                             f'epochs they are meant for')


def all_flags():
    """Every method flag: name -> (Flag, {mode: default})."""
    out = {}
    for m in METHODS.values():
        for name, flag in m.flags.items():
            out.setdefault(name, (flag, {}))[1][m.name] = m.defaults[name]
    return out


@dataclass
class Context:
    """What a method's `build` may use."""
    args: Any                       # resolved flags, the method's defaults filled in
    student_shapes: Mapping[str, Tuple[int, ...]]  # per-sample shape of stem, rb1..3, feat, out
    teacher_shapes: Mapping[str, Tuple[int, ...]]
    num_class: int
    n_data: int                     # size of the training split
    train_labels: torch.Tensor      # [n_data] int64, on the training device
    device: torch.device
    student: Optional[nn.Module] = None  # the networks, for methods that run them again (BSS)
    teacher: Optional[nn.Module] = None  # or read their classifier (`head`); never register them

    def stage_keys(self, method):
        """The stages ('rb1', 'rb2', ...) that student and teacher both have, in
        order; a method that pairs stages needs equal counts (ConfigError)."""
        s = [k for k in self.student_shapes if k.startswith('rb')]
        t = [k for k in self.teacher_shapes if k.startswith('rb')]
        if len(s) != len(t):
            raise ConfigError(f'{method} pairs the stages of student and teacher, but the student '
                              f'has {len(s)} ({", ".join(s)}) and the teacher {len(t)}')
        return tuple(s)


@dataclass
class PretrainPhase:
    """A training phase run before the main schedule, optimising `params`
    with SGD (momentum and weight decay as the main optimiser's).

    Each step runs the teacher (no grad) and, if `needs_student`, the student
    (train mode), then minimises `loss(s, t, batch)` (s is None when the
    student is not run). `train_modules` are put in train mode for the phase.
    The lr of epoch e (from 1) is `lr_scale(e) * --lr`.

    Every step updates every parameter its optimiser holds: one the loss
    does not reach (AB/FSP's classifier) has a zero gradient, so weight
    decay and momentum still move it, as in the seed, whose init loss adds
    0 * cross-entropy to the same effect.

    The optimiser is one of the phase's own (fresh momentum; Nesterov as
    --nesterov unless `nesterov` says otherwise), or, with
    `shares_main_optimizer`, the main schedule's: one SGD for both, as the
    seed's AB/FSP use, holding `params` besides the main schedule's own, so
    the phase's momentum carries into the first main steps (and a resumed
    run restores it in either phase). Such a phase then steps every
    parameter of that optimiser, and `nesterov` must stay None."""
    name: str
    epochs: int
    lr_scale: Callable[[int], float]
    params: Sequence[nn.Parameter]
    loss: Callable
    needs_student: bool = True
    train_modules: Sequence[nn.Module] = ()
    shares_main_optimizer: bool = False
    nesterov: Optional[bool] = None  # None: --nesterov (FT's paraphraser: False, the seed's)


class Distiller(nn.Module):
    """Glue between the networks' outputs and a method's loss.

    forward(s, t, batch) -> scalar KD loss, where s and t are the student's
    and the teacher's features (`Features(stem, rb1, rb2, rb3, feat, out)`,
    or `Features4` with rb4 for four-stage networks) and batch is
    `Batch(img, target, idx)`. A method with views ('weak', 'strong') gets
    s and t as (weak, strong) pairs of features and a `TwoViewBatch(img,
    target, idx, strong)` (dataset.py). The teacher's features carry no graph unless
    `teacher_grad` is set. With `loss_terms` set, forward returns a dict
    {term: scalar} instead, whose sum is the KD loss; each term is logged."""

    # True: the teacher runs with autograd on an input that requires grad, so
    # the loss can differentiate through it (its parameters stay frozen).
    teacher_grad = False
    # False: the loss needs the host inside the step (e.g. torch.linalg.svd
    # checks its result), so --compile runs this method's step eagerly.
    capturable = True
    # Names of the loss's terms (e.g. ('tckd', 'nckd')) when forward returns a dict.
    loss_terms: Tuple[str, ...] = ()

    def pretrain_phases(self, ctx) -> List[PretrainPhase]:
        """Phases to run before the main schedule (AB/FSP initialisation, FT's paraphraser)."""
        return []

    def kd_weight(self, epoch, epochs) -> float:
        """Multiplier of lambda_kd in main-schedule epoch `epoch` (from 1). Where it
        is 0 the loop skips the KD term entirely (no teacher forward, no call)."""
        return 1.0

    def begin_epoch(self, epoch, epochs):
        """Called before main-schedule epoch `epoch` (from 1): per-epoch state
        such as a curriculum. Keep such state in tensors updated in place
        (`buffer.fill_(value)`), so a captured step reads the new value."""

    def wrap_student(self, student) -> nn.Module:
        """The module that is trained, evaluated and saved as the student: the
        student itself, or a wrapper whose `out` comes from another head (SimKD
        classifies with the teacher's). It must return the student's features."""
        return student

    def learnable_parameters(self):
        """Parameters the main optimiser updates with the student."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def teacher_sharing(self):
        """Why this method cannot share one teacher pass with other students
        (train_kd.py --kd_mode a,b,...), or '' where it can."""
        if self.teacher_grad:
            return 'its loss differentiates through the teacher (teacher_grad): each student needs its own pass'
        return ''


def pick(features, key, act=None):
    """features.key, or its pre (act='pre') / post (act='post') activation."""
    value = getattr(features, key)
    if isinstance(value, tuple):
        if act not in ('pre', 'post'):
            raise ValueError(f'{key} is a (pre, post) pair: say which with act')
        return value[0] if act == 'pre' else value[1]
    return value


class FeatureDistiller(Distiller):
    """Applies a loss to the same named features of student and teacher and
    averages over them: one shared loss module, or one module per feature
    (connectors with their own parameters).

    A `relational` loss compares the samples of a batch with each other
    (similarities, distances): under torchrun it is computed on the global
    batch gathered from every process, so it is the loss one process gives."""

    def __init__(self, loss, keys, act=None, relational=False):
        super().__init__()
        self.keys, self.act, self.relational = tuple(keys), act, relational
        if isinstance(loss, (list, tuple, nn.ModuleList)):
            if len(loss) != len(self.keys):
                raise ValueError('one loss module per feature')
            self.per_key = nn.ModuleList(loss)
        else:
            self.shared = loss
        self.is_shared = not isinstance(loss, (list, tuple, nn.ModuleList))

    def forward(self, s, t, batch):
        total = 0.0
        for i, key in enumerate(self.keys):  # unrolled when traced: a fixed list of features
            loss = self.shared if self.is_shared else self.per_key[i]
            fs, ft = pick(s, key, self.act), pick(t, key, self.act).detach()
            if self.relational:
                fs, ft = gather_batch(fs, differentiable=True), gather_batch(ft)
            total = total + loss(fs, ft)
        return total / len(self.keys)
