"""The published top-1 numbers the summary compares our runs with, as data.

One `Record` per published number: the method, the teacher and student
networks (names as in network.NETWORKS), the dataset, the top-1 (%), its
`Source` (title, URL, the table it is in) and the `Protocol` it was obtained
under (epochs, augmentation, best or last epoch, how many runs it averages and
how). Numbers are transcribed exactly; a field the source does not state is
None ("not stated"), never guessed.

How a record's method is keyed:
- a registered `--kd_mode` name ('st' for KD, 'fitnet', 'crd', 'dkd', 'mlkd',
  'sdd_kd', ...);
- 'teacher' and 'student' for the baselines: the accuracy of the teacher or of
  the student trained alone, as the source gives it for that pair; the seed's
  README lists its baselines without a pair: 'student' with teacher '-';
- 'dml' for deep mutual learning (train_dml.py): teacher and student are
  net1 and net2, and `net` says which of the two the number is;
- a variant is the mode and its switch joined by '+': 'st+logit_stand' is
  `--kd_mode st --logit_stand` (logit standardisation, Sun et al. 2024),
  'st+dot' is `--kd_mode st --optimizer dot` (DOT, Zhao et al. 2023);
- `settings`: the values of the mode's flags the number was obtained with,
  where the source reports the same method under several (SimKD's projector
  factor); such a record matches only runs with those values.

Several sources may give a number for the same method and pair (SimKD's paper
re-runs KD, mdistiller quotes RepDistiller). `reference()` picks the one the
benchmark table shows: the first in RECORDS' order, which lists the method's
own source first; the report lists them all.

Sources that could not be reached when this was transcribed, and so are not
here: KDSVD's and CAT-KD's numbers (their READMEs give none), NKD's own paper
(SDD's re-run is here), SRRL's own paper (SimKD's re-run is here), MLKD's
paper (the logit standardisation README's copy is here) and ReviewKD's paper
(two of its numbers, via Papers with Code, are here). Combinations without a
mode here are left out: CRD+KD (the CRD paper's Tables 1 and 2; RepDistiller
runs it as crd with -a 1, a KD term the zoo's crd does not add; its README
has no such row), ICKD with KD, WTTM+CRD, TTM, ITRD, HKD, SD-NKD.
"""
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

# The CIFAR-100 benchmark of Tian et al. (ICLR 2020): its 13 teacher -> student
# pairs, in RepDistiller's README order (same-architecture table, then the other).
PAIRS = (('resnet56', 'resnet20'), ('resnet110', 'resnet20'), ('resnet110', 'resnet32'),
         ('resnet32x4', 'resnet8x4'), ('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'),
         ('vgg13', 'vgg8'), ('vgg13', 'MobileNetV2'), ('ResNet50', 'MobileNetV2'),
         ('ResNet50', 'vgg8'), ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2'),
         ('wrn_40_2', 'ShuffleV1'))
BASELINES = ('teacher', 'student')
# Keys that are a training script rather than a --kd_mode.
SCRIPT_METHODS = ('dml',)
# The switches a variant key may carry after '+', and the run flag each means.
VARIANT_SWITCHES = {'logit_stand': ('logit_stand', True), 'dot': ('optimizer', 'dot')}


@dataclass(frozen=True)
class Source:
    name: str    # short, for a table cell
    title: str
    url: str


@dataclass(frozen=True)
class Protocol:
    epochs: Optional[int]        # length of the training schedule
    augmentation: Optional[str]
    epoch: Optional[str]         # 'best' or 'last': which epoch's test accuracy is reported
    runs: Optional[int]          # how many runs the number averages
    statistic: Optional[str]     # how the runs are combined: 'mean', 'mean ± std', ...
    basis: str = ''              # where the fields above come from (README text, the code)

    def describe(self):
        """One line, with 'not stated' for what the source leaves open."""
        epochs = f'{self.epochs} epochs' if self.epochs else 'epochs not stated'
        epoch = f'{self.epoch} epoch' if self.epoch else 'best or last epoch not stated'
        if self.runs:
            runs = f'{self.statistic or "mean"} of {self.runs} runs' if self.runs > 1 else '1 run'
        else:
            runs = f'{self.statistic}, runs not stated' if self.statistic else 'runs not stated'
        return f'{epochs}; {self.augmentation or "augmentation not stated"}; {epoch}; {runs}'


@dataclass(frozen=True)
class Record:
    method: str
    teacher: str
    student: str
    top1: float
    source: Source
    table: str                    # the table of the source it is in
    protocol: Protocol
    dataset: str = 'cifar100'
    benchmark: str = 'crd'        # the summary table it belongs with: 'crd' or 'seed'
    std: Optional[float] = None   # the spread the source gives beside it, if any
    settings: Mapping = field(default_factory=dict)
    note: str = ''
    net: str = 'net'              # DML: 'net1' or 'net2', the network of the pair it is


ZERO_PAD_CROP_FLIP = 'random crop 32 of the zero-padded (4) image, horizontal flip'
REFLECT_PAD_CROP_FLIP = 'random crop 32 of the reflect-padded (4) image, horizontal flip'

REPDISTILLER = Source('RepDistiller README', 'Contrastive Representation Distillation (Tian et al., '
                      'ICLR 2020): RepDistiller README, "Benchmark Results on CIFAR-100"',
                      'https://github.com/HobbitLong/RepDistiller')
MDISTILLER = Source('mdistiller README', 'Decoupled Knowledge Distillation (Zhao et al., CVPR 2022) '
                    'and DOT: A Distillation-Oriented Trainer (Zhao et al., ICCV 2023): mdistiller README',
                    'https://github.com/megvii-research/mdistiller')
LOGIT_STAND = Source('logit standardisation README', 'Logit Standardization in Knowledge Distillation '
                     '(Sun et al., CVPR 2024): README, "Results and Logs"',
                     'https://github.com/sunshangquan/logit-standardization-KD')
CTKD = Source('CTKD README', 'Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023): '
              'README, "Main Results"', 'https://github.com/zhengli97/CTKD')
DIST = Source('DIST README', 'Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022): '
              'README, CIFAR-100', 'https://github.com/hunto/DIST_KD')
WTTM = Source('WTTM README', 'Knowledge Distillation Based on Transformed Teacher Matching (Zheng and '
              'Yang, ICLR 2024): README, "Benchmark Results on CIFAR-100"', 'https://github.com/zkxufo/TTM')
ICKD = Source('ICKD README', 'Exploring Inter-Channel Correlation for Diversity-preserved Knowledge '
              'Distillation (Liu et al., ICCV 2021): Cifar100/README.md, "Benchmark Results on CIFAR-100"',
              'https://github.com/ADLab-AutoDrive/ICKD')
SIMKD = Source('SimKD README', 'Knowledge Distillation with the Reused Teacher Classifier (Chen et al., '
               'CVPR 2022): README, "Some results on CIFAR-100"', 'https://github.com/DefangChen/SimKD')
SEMCKD = Source('SemCKD README', 'Cross-Layer Distillation with Semantic Calibration (Chen et al., '
                'AAAI 2021): README, "CIFAR-100 Results" (images/result.png)',
                'https://github.com/DefangChen/SemCKD')
SDD = Source('SDD README', 'Scale Decoupled Distillation (Wei et al., CVPR 2024): README, "Main result" '
             'on CIFAR100 (cifar100.png)', 'https://github.com/shicaiwei123/SDD-CVPR2024')
REVIEWKD = Source('ReviewKD paper (Papers with Code)', 'Distilling Knowledge via Knowledge Review (Chen '
                  'et al., CVPR 2021): CIFAR-100 results as listed by Papers with Code',
                  'https://paperswithcode.com/paper/distilling-knowledge-via-knowledge-review')
SEED = Source('seed README', 'Knowledge-Distillation-Zoo README (the seed of this zoo), "Results"',
              'https://github.com/AberHu/Knowledge-Distillation-Zoo')

# The protocols. RepDistiller and the code built on it (mdistiller and its
# descendants, CTKD, SimKD, SemCKD) train 240 epochs and keep the best test
# accuracy over the epochs (train_student.py's best_acc, mdistiller's
# trainer best_acc); none of the READMEs says how many runs a number averages.
REPDISTILLER_PROTOCOL = Protocol(240, ZERO_PAD_CROP_FLIP, 'best', None, None,
                                 'train_student.py: --epochs 240, reports best_acc')
MDISTILLER_PROTOCOL = Protocol(240, ZERO_PAD_CROP_FLIP, 'best', None, None,
                               'engine/cfg.py SOLVER.EPOCHS 240; trainer.py keeps best_acc')
LOGIT_STAND_PROTOCOL = Protocol(240, ZERO_PAD_CROP_FLIP, 'best', None, 'mean',
                                'mdistiller code; the README: "due to average operation and randomness"')
MEAN_STD_PROTOCOL = Protocol(240, ZERO_PAD_CROP_FLIP, 'best', None, 'mean ± std',
                             'train_student.py: --epochs 240, reports best_acc; the table gives mean ± std')
DIST_PROTOCOL = Protocol(None, None, None, None, 'mean ± std',
                         'the README gives mean ± std; its CIFAR config is not in the repository')
UNSTATED = Protocol(None, None, None, None, None, 'not stated where the numbers are published')
# The seed: 200 epochs (train_kd.py), reflect padding; its README does not say
# which epoch or how many runs.
SEED_PROTOCOL = Protocol(200, REFLECT_PAD_CROP_FLIP, None, None, None,
                         'train_*.py: --epochs 200, Pad(4, reflect) + RandomCrop(32) + flip')


def _table(source, table, protocol, pairs, rows, **common):
    """Records of one published table: `rows` maps a method key to one entry
    per pair in `pairs`: a number, (number, std), or None where the table has
    no number (N/A)."""
    out = []
    for method, values in rows.items():
        assert len(values) == len(pairs), (source.name, table, method)
        for (teacher, student), value in zip(pairs, values):
            if value is None:
                continue
            top1, std = value if isinstance(value, tuple) else (value, None)
            out.append(Record(method, teacher, student, top1, source, table, protocol, std=std, **common))
    return out


def _baselines(source, table, protocol, pairs, teachers, students, **common):
    return _table(source, table, protocol, pairs, {'teacher': teachers, 'student': students}, **common)


# ----------------------------------------------------------------------------- RepDistiller
_RD_SAME = (('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'),
            ('resnet110', 'resnet20'), ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'),
            ('vgg13', 'vgg8'))
_RD_CROSS = (('vgg13', 'MobileNetV2'), ('ResNet50', 'MobileNetV2'), ('ResNet50', 'vgg8'),
             ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2'), ('wrn_40_2', 'ShuffleV1'))
_T1, _T2 = 'table 1 (same architecture type)', 'table 2 (different architecture type)'
RECORDS = (
    _baselines(REPDISTILLER, _T1, REPDISTILLER_PROTOCOL, _RD_SAME,
               (75.61, 75.61, 72.34, 74.31, 74.31, 79.42, 74.64),
               (73.26, 71.98, 69.06, 69.06, 71.14, 72.50, 70.36))
    + _table(REPDISTILLER, _T1, REPDISTILLER_PROTOCOL, _RD_SAME, {
        'st': (74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98),
        'fitnet': (73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02),
        'at': (74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43),
        'sp': (73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68),
        'cc': (73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71),
        'vid': (74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23),
        'rkd': (73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48),
        'pkt': (74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88),
        'ab': (72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94),
        'ft': (73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58),
        'fsp': (72.91, None, 69.95, 70.11, 71.89, 72.62, 70.23),   # N/A in the README
        'nst': (73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53),
        'crd': (75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94)})
    + _baselines(REPDISTILLER, _T2, REPDISTILLER_PROTOCOL, _RD_CROSS,
                 (74.64, 79.34, 79.34, 79.42, 79.42, 75.61), (64.60, 64.60, 70.36, 70.50, 71.82, 70.50))
    + _table(REPDISTILLER, _T2, REPDISTILLER_PROTOCOL, _RD_CROSS, {   # no FSP row in this table
        'st': (67.37, 67.35, 73.81, 74.07, 74.45, 74.83),
        'fitnet': (64.14, 63.16, 70.69, 73.59, 73.54, 73.73),
        'at': (59.40, 58.58, 71.84, 71.73, 72.73, 73.32),
        'sp': (66.30, 68.08, 73.34, 73.48, 74.56, 74.52),
        'cc': (64.86, 65.43, 70.25, 71.14, 71.29, 71.38),
        'vid': (65.56, 67.57, 70.30, 73.38, 73.40, 73.61),
        'rkd': (64.52, 64.43, 71.50, 72.28, 73.21, 72.21),
        'pkt': (67.13, 66.52, 73.01, 74.10, 74.69, 73.89),
        'ab': (66.06, 67.20, 70.65, 73.55, 74.31, 73.34),
        'ft': (61.78, 60.99, 70.29, 71.75, 72.50, 72.03),
        'nst': (58.16, 64.96, 71.28, 74.12, 74.68, 74.89),
        'crd': (69.73, 69.11, 74.30, 75.11, 75.65, 76.05)})
)

# ----------------------------------------------------------------------------- mdistiller (DKD, DOT)
# The DKD README's second table heads its last column "ResNet32x4 MobileNet-V2",
# but its KD number there (74.45) is RepDistiller's resnet32x4 -> ShuffleV2,
# the DKD paper's table has that pair, and the repository's config for it is
# configs/cifar100/dkd/res32x4_shuv2.yaml (none for a MobileNetV2 student of
# resnet32x4): recorded as resnet32x4 -> ShuffleV2.
_SHUV2_NOTE = 'the README heads this column "ResNet32x4 MobileNet-V2": resnet32x4 -> ShuffleV2 (see published.py)'
RECORDS += _table(MDISTILLER, 'DKD, CIFAR-100 table 1', MDISTILLER_PROTOCOL,
                  (('resnet56', 'resnet20'), ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'),
                   ('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('vgg13', 'vgg8')), {
                      'dkd': (71.97, 74.11, 76.32, 76.23, 74.81, 74.68),
                      'st': (70.66, 73.08, 73.33, 74.92, 73.54, 72.98)})
RECORDS += _table(MDISTILLER, 'DKD, CIFAR-100 table 2', MDISTILLER_PROTOCOL,
                  (('resnet32x4', 'ShuffleV1'), ('wrn_40_2', 'ShuffleV1'), ('vgg13', 'MobileNetV2'),
                   ('ResNet50', 'MobileNetV2')), {
                      'dkd': (76.45, 76.70, 69.71, 70.35),
                      'st': (74.07, 74.83, 67.37, 67.35)})
RECORDS += [Record('dkd', 'resnet32x4', 'ShuffleV2', 77.07, MDISTILLER, 'DKD, CIFAR-100 table 2',
                   MDISTILLER_PROTOCOL, note=_SHUV2_NOTE),
            Record('st', 'resnet32x4', 'ShuffleV2', 74.45, MDISTILLER, 'DKD, CIFAR-100 table 2',
                   MDISTILLER_PROTOCOL, note=_SHUV2_NOTE)]
RECORDS += _table(MDISTILLER, 'DOT, CIFAR-100', MDISTILLER_PROTOCOL,
                  (('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8'), ('resnet32x4', 'ShuffleV2')), {
                      'st+dot': (75.12, 73.77, 75.55),
                      'st': (73.33, 72.98, 74.45)})

# ----------------------------------------------------------------------------- CTKD
RECORDS += _table(CTKD, 'CIFAR-100', REPDISTILLER_PROTOCOL,
                  (('resnet56', 'resnet20'), ('resnet110', 'resnet32'), ('resnet110', 'resnet20'),
                   ('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('vgg13', 'vgg8')), {
                      'ctkd': (71.19, 73.52, 70.99, 75.45, 73.93, 73.52),   # the "+CTKD" row: KD with CTKD
                      'st': (70.66, 73.08, 70.66, 74.92, 73.54, 72.98)})

# ----------------------------------------------------------------------------- logit standardisation
_LS_SAME = (('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8'), ('wrn_40_2', 'wrn_40_1'),
            ('wrn_40_2', 'wrn_16_2'), ('resnet56', 'resnet20'), ('resnet110', 'resnet32'),
            ('resnet110', 'resnet20'))
_LS_DISTINCT = (('resnet32x4', 'ShuffleV2'), ('resnet32x4', 'wrn_16_2'), ('resnet32x4', 'wrn_40_2'),
                ('wrn_40_2', 'resnet8x4'), ('wrn_40_2', 'MobileNetV2'), ('vgg13', 'MobileNetV2'),
                ('ResNet50', 'MobileNetV2'))
RECORDS += _table(LOGIT_STAND, 'table 1 (identical structures)', LOGIT_STAND_PROTOCOL, _LS_SAME, {
    'st+logit_stand': (76.62, 74.36, 74.37, 76.11, 71.43, 74.17, 71.48),
    'ctkd+logit_stand': (76.67, 74.47, 74.58, 76.08, 71.34, 74.01, 71.39),
    'dkd+logit_stand': (77.01, 74.81, 74.89, 76.39, 72.32, 74.29, 71.85),
    'mlkd+logit_stand': (78.28, 75.22, 75.56, 76.95, 72.33, 74.32, 72.27),
    'mlkd': (77.08, 75.18, 75.35, 76.63, 72.19, 74.11, 71.89),
    'st': (73.33, 72.98, 73.54, 74.92, 70.66, 73.08, 70.67),
    'ctkd': (73.39, 73.52, 73.93, 75.45, 71.19, 73.52, 70.99),
    'dkd': (76.32, 74.68, 74.81, 76.24, 71.97, 74.11, 71.06)})
RECORDS += _table(LOGIT_STAND, 'table 2 (distinct structures)', LOGIT_STAND_PROTOCOL, _LS_DISTINCT, {
    'st+logit_stand': (75.56, 75.26, 77.92, 77.11, 69.23, 68.61, 69.02),
    'ctkd+logit_stand': (76.18, 75.16, 77.99, 77.03, 69.53, 68.98, 69.36),
    'dkd+logit_stand': (77.37, 76.19, 78.95, 76.75, 70.01, 69.98, 70.45),
    'mlkd+logit_stand': (78.76, 77.53, 79.66, 77.68, 71.61, 70.94, 71.19),
    'mlkd': (78.44, 76.52, 79.26, 77.33, 70.78, 70.57, 71.04),
    'st': (74.45, 74.90, 77.70, 73.97, 68.36, 67.37, 67.35),
    'ctkd': (75.37, 74.57, 77.66, 74.61, 68.34, 68.50, 68.67),
    'dkd': (77.07, 75.70, 78.46, 75.56, 69.28, 69.71, 70.35)})

# MLKD's rows there (MLKD and MLKD+Ours alike: the README trains both with
# configs/cifar100/mlkd/<pair>.yaml) come from a longer schedule on two views
# of each image: SOLVER.EPOCHS 480 in every config but resnet32x4_ShuffleV1/V2's
# 960 (line 11), the weak view plus RandAugment(2, 10) and Cutout
# (mdistiller/dataset/cifar100.py, get_cifar100_train_transform_strong).
_LS_MLKD_960 = {('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2')}
LS_MLKD_AUGMENTATION = (ZERO_PAD_CROP_FLIP + '; a second, strong view: RandAugment (2 ops, magnitude 10) '
                        'and Cutout')
RECORDS[:] = [replace(r, protocol=replace(
    r.protocol, epochs=960 if (r.teacher, r.student) in _LS_MLKD_960 else 480,
    augmentation=LS_MLKD_AUGMENTATION,
    basis=f'configs/cifar100/mlkd/{r.teacher}_{r.student}.yaml line 11 (SOLVER.EPOCHS); '
          f'{r.protocol.basis}'))
              if r.source is LOGIT_STAND and r.method in ('mlkd', 'mlkd+logit_stand') else r
              for r in RECORDS]

# ----------------------------------------------------------------------------- DIST
RECORDS += _table(DIST, 'CIFAR-100', DIST_PROTOCOL,
                  (('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'), ('resnet32x4', 'resnet8x4'),
                   ('ResNet50', 'MobileNetV2'), ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2')),
                  {'dist': ((74.43, 0.24), (71.75, 0.30), (76.31, 0.19), (68.66, 0.23), (76.34, 0.18),
                            (77.35, 0.25))})

# ----------------------------------------------------------------------------- WTTM and ICKD
# Both on RepDistiller's code (train_student.py: --epochs 240, best_acc) and
# its 13 pairs. WTTM's tables also give DIST for every pair (after DIST's own
# README here); their TTM, ITRD and WTTM+CRD/ITRD rows have no mode here.
RECORDS += _table(WTTM, _T1, REPDISTILLER_PROTOCOL, _RD_SAME, {
    'wttm': (76.37, 74.58, 71.92, 71.67, 74.13, 76.06, 74.44),
    'dist': (75.51, 74.73, 71.75, 71.65, 73.69, 76.31, 73.89)})
RECORDS += _table(WTTM, _T2, REPDISTILLER_PROTOCOL, _RD_CROSS, {
    'wttm': (69.16, 69.59, 74.82, 74.37, 76.55, 75.42),
    'dist': (68.50, 68.66, 74.11, 76.34, 77.35, 76.40)})
# ICKD's README: the "ICKD-C(w/o KL)" row is --kd_mode ickd (CE + ICKD); its
# "ICKD-C(Ours)" adds KD, a combination with no mode here.
RECORDS += _table(ICKD, 'same architecture type', REPDISTILLER_PROTOCOL, _RD_SAME, {
    'ickd': (75.64, 74.33, 71.76, 71.68, 73.89, 75.25, 73.42)})

# ----------------------------------------------------------------------------- SDD (and its re-runs)
_SDD_PAIRS = (('resnet32x4', 'ShuffleV1'), ('wrn_40_2', 'ShuffleV1'), ('ResNet50', 'MobileNetV2'),
              ('vgg13', 'MobileNetV2'), ('resnet32x4', 'ShuffleV2'), ('ResNet50', 'vgg8'))
RECORDS += _table(SDD, 'CIFAR-100', MDISTILLER_PROTOCOL, _SDD_PAIRS, {
    'sdd_kd': (76.30, 76.65, 69.55, 68.79, 76.67, 74.89),
    'sdd_dkd': (77.30, 77.21, 71.36, 70.25, 78.05, 75.86),
    'nkd': (75.31, 75.96, 69.39, 68.72, 76.26, 74.01),
    'st': (74.07, 74.83, 67.35, 67.37, 74.45, 73.81),
    'dkd': (76.45, 76.70, 70.35, 69.71, 77.07, 75.34)})

# ----------------------------------------------------------------------------- SemCKD and SimKD
# SemCKD's table gives its students' own baselines; two differ from
# RepDistiller's (ShuffleNetV2 72.60 against 71.82, MobileNetV2 65.43 against
# 64.60), so its students there may not be network.py's: said in the notes.
_SEMCKD_PAIRS = (('resnet32x4', 'vgg8'), ('resnet32x4', 'vgg13'), ('vgg13', 'ShuffleV2'),
                 ('resnet32x4', 'ShuffleV2'), ('wrn_40_2', 'MobileNetV2'), ('vgg13', 'vgg8'),
                 ('resnet32x4', 'resnet8x4'))
RECORDS += _table(SEMCKD, 'CIFAR-100 (mean ± std)', MEAN_STD_PROTOCOL, _SEMCKD_PAIRS, {
    'semckd': ((75.27, 0.13), (79.43, 0.02), (76.39, 0.12), (77.62, 0.32), (69.61, 0.05), (74.43, 0.25),
               (76.23, 0.04)),
    'st': ((72.73, 0.15), (77.17, 0.11), (75.60, 0.21), (75.49, 0.24), (68.70, 0.22), (73.38, 0.05),
           (74.42, 0.05)),
    'fitnet': ((72.91, 0.18), (77.06, 0.14), (75.44, 0.11), (75.82, 0.22), (68.64, 0.12), (73.63, 0.11),
               (74.32, 0.08)),
    'at': ((71.90, 0.13), (77.23, 0.19), (75.41, 0.10), (75.91, 0.14), (68.79, 0.13), (73.51, 0.08),
           (75.07, 0.03)),
    'sp': ((73.12, 0.10), (77.72, 0.33), (75.54, 0.18), (75.77, 0.08), (68.48, 0.36), (73.53, 0.23),
           (74.29, 0.07)),
    'vid': ((73.19, 0.23), (77.45, 0.13), (75.22, 0.07), (75.55, 0.18), (68.37, 0.24), (73.63, 0.07),
            (74.55, 0.10)),
    'student': ((70.46, 0.29), (74.82, 0.22), (72.60, 0.12), (72.60, 0.12), (65.43, 0.29), (70.46, 0.29),
                (73.09, 0.30)),
    'teacher': (79.42, 79.42, 74.64, 79.42, 75.61, 74.64, 79.42)},
    note='SemCKD\'s own student baselines: ShuffleNetV2 72.60 and MobileNetV2 65.43 (RepDistiller: 71.82, 64.60)')
# SimKD's README: teacher resnet32x4, students resnet8x4 and vgg8 (its third,
# ShuffleNetV2x1.5, is not a network here); SimKD at three projector factors.
_SIMKD_PAIRS = (('resnet32x4', 'resnet8x4'), ('resnet32x4', 'vgg8'))
_SIMKD_TABLE = 'Some results on CIFAR-100'
RECORDS += _table(SIMKD, _SIMKD_TABLE, MEAN_STD_PROTOCOL, _SIMKD_PAIRS, {
    'student': (73.09, 70.46), 'st': (74.42, 72.73), 'fitnet': (74.32, 72.91), 'at': (75.07, 71.90),
    'sp': (74.29, 73.12), 'vid': (74.55, 73.19), 'crd': (75.59, 73.54), 'srrl': (75.39, 73.23),
    'semckd': (76.23, 75.27), 'teacher': (79.42, 79.42)})
for _factor, _values in ((2, (78.08, 75.76)), (4, (77.88, 75.62)), (8, (76.73, 74.74))):
    RECORDS += _table(SIMKD, _SIMKD_TABLE, MEAN_STD_PROTOCOL, _SIMKD_PAIRS, {'simkd': _values},
                      settings={'simkd_factor': _factor})

# ----------------------------------------------------------------------------- ReviewKD
RECORDS += _table(REVIEWKD, 'CIFAR-100', UNSTATED, (('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8')),
                  {'reviewkd': (75.63, 74.84)})

# ----------------------------------------------------------------------------- the seed's table
_SEED_TABLE = 'Results (CIFAR10 and CIFAR100 columns)'
_SEED = {  # (teacher, student) -> {mode: (CIFAR-10, CIFAR-100)}
    ('-', 'resnet20'): {'student': (92.37, 68.92)},
    ('-', 'resnet110'): {'student': (93.86, 73.15)},
    ('resnet20', 'resnet20'): {
        'logits': (93.30, 70.36), 'st': (93.12, 70.27), 'at': (92.89, 69.70), 'fitnet': (92.73, 70.08),
        'nst': (92.79, 69.21), 'pkt': (92.50, 69.25), 'fsp': (92.76, 69.61), 'ft': (92.98, 69.90),
        'rkd': (92.72, 69.48), 'ab': (93.04, 69.96), 'sp': (92.88, 69.85), 'sobolev': (92.78, 69.39),
        'bss': (92.58, 69.96), 'cc': (93.01, 69.27), 'lwm': (92.80, 69.23), 'irg': (92.77, 70.37),
        'vid': (92.61, 69.39), 'ofd': (92.82, 69.93), 'afd': (92.56, 69.63), 'crd': (92.96, 70.33)},
    ('resnet110', 'resnet20'): {
        'logits': (92.98, 69.78), 'st': (92.82, 70.06), 'at': (93.21, 69.28), 'fitnet': (93.04, 69.81),
        'nst': (92.83, 69.31), 'pkt': (93.01, 69.31), 'fsp': (92.78, 69.78), 'ft': (93.01, 69.49),
        'rkd': (93.21, 69.36), 'ab': (92.96, 69.41), 'sp': (93.30, 69.45), 'sobolev': (92.60, 69.23),
        'bss': (92.78, 69.71), 'cc': (92.98, 69.33), 'lwm': (92.52, 69.11), 'irg': (93.13, 69.36),
        'vid': (92.98, 69.49), 'ofd': (93.13, 69.81), 'afd': (92.92, 69.60), 'crd': (92.92, 70.80)},
    ('resnet110', 'resnet110'): {
        'logits': (94.38, 74.89), 'st': (94.59, 74.33), 'at': (94.42, 74.64), 'fitnet': (94.43, 73.63),
        'nst': (94.43, 73.55), 'pkt': (94.35, 73.74), 'fsp': (94.39, 73.59), 'ft': (94.30, 74.72),
        'rkd': (94.39, 73.78), 'ab': (94.63, 73.91), 'sp': (94.45, 74.07), 'sobolev': (94.26, 73.14),
        'bss': (94.19, 73.87), 'cc': (94.49, 74.43), 'lwm': (94.19, 73.28), 'irg': (94.44, 74.96),
        'vid': (94.25, 73.63), 'ofd': (94.38, 74.11), 'afd': (94.44, 73.90), 'crd': (94.30, 75.44)},
}
for (_teacher, _student), _rows in _SEED.items():
    for _column, _dataset in enumerate(('cifar10', 'cifar100')):
        RECORDS += _table(SEED, _SEED_TABLE, SEED_PROTOCOL, ((_teacher, _student),),
                          {m: (v[_column],) for m, v in _rows.items()}, dataset=_dataset, benchmark='seed')
# Its DML table: net1 / net2 per dataset.
_SEED_DML = {('resnet20', 'resnet20'): ((93.07, 93.37), (70.39, 70.22)),
             ('resnet110', 'resnet20'): ((94.45, 92.92), (74.53, 70.29)),
             ('resnet110', 'resnet110'): ((94.74, 94.79), (74.72, 75.55))}
for (_net1, _net2), _by_data in _SEED_DML.items():
    for _dataset, _values in zip(('cifar10', 'cifar100'), _by_data):
        for _net, _value in zip(('net1', 'net2'), _values):
            RECORDS.append(Record('dml', _net1, _net2, _value, SEED, 'DML table (net1 / net2)', SEED_PROTOCOL,
                                  dataset=_dataset, benchmark='seed', net=_net))

RECORDS = tuple(RECORDS)
SOURCES = tuple(dict.fromkeys(r.source for r in RECORDS))


def variant_key(mode, args):
    """A run's method key: its --kd_mode, '+logit_stand' if it standardised
    the logits, '+dot' if it trained with --optimizer dot."""
    key = mode
    for switch, (flag, value) in VARIANT_SWITCHES.items():
        if args.get(flag) == value:
            key += '+' + switch
    return key


def base_mode(method):
    """'dkd+logit_stand' -> 'dkd'."""
    return method.split('+')[0]


def _settings_match(record, args):
    """Whether a run with flags `args` ran with the record's settings (None:
    no run to match, every record does)."""
    return args is None or all(args.get(k) == v for k, v in record.settings.items())


def matching(method, teacher, student, dataset='cifar100', benchmark='crd', args=None, net='net'):
    """Every record for a row of ours, in RECORDS' order. `method` is a
    variant key, or '' for a baseline of the network `student` (matched by the
    number a source gives it as teacher or as student of any pair); `net`:
    which network of a DML pair."""
    found = []
    for r in RECORDS:
        if r.dataset != dataset or r.benchmark != benchmark or r.net != net:
            continue
        if method == '':
            if (r.method == 'teacher' and r.teacher == student) or (r.method == 'student' and r.student == student):
                found.append(r)
        elif (r.method, r.teacher, r.student) == (method, teacher, student) and _settings_match(r, args):
            found.append(r)
    return found


def reference(method, teacher, student, dataset='cifar100', benchmark='crd', args=None, net='net'):
    """The record the benchmark table shows for a row of ours (see the module
    docstring), or None."""
    found = matching(method, teacher, student, dataset, benchmark, args, net)
    return found[0] if found else None


def top1(method, teacher, student, dataset='cifar100', benchmark='crd'):
    """The reference number (e.g. top1('crd', 'resnet32x4', 'resnet8x4') == 75.51), or None."""
    r = reference(method, teacher, student, dataset, benchmark)
    return None if r is None else r.top1
