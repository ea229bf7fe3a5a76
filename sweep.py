"""The sweep (example_train_script.sh) in Python: the one table of its
settings and their check, the plan of runs the script hands over, and the
decisions every executor shares (finished, resumed or started again; on a GPU
or the CPU). The executors are sweep_local.py (this machine) and
sweep_slurm.py (a SLURM cluster, through submitit; imported only for it).

The sweep is told what to run by environment variables (TABLE, MODES, EPOCHS,
DRY_RUN, EXECUTOR, ...). `SETTINGS` lists each one: its name, the values it
takes, its default and what it does. `check_settings` resolves an environment
against it: an unset setting takes its default (some depend on TABLE), lists
come out single-spaced, whole numbers without leading zeros, DRY_RUN as 0 or
1, TIME_LIMIT as minutes. A value that is not allowed, a cluster setting
without EXECUTOR=slurm, or an environment variable that looks like a misspelt
setting (`MODE`, `EPOCH`, `modes`, `DMLPAIRS`, `EPOHCS`: another case or
punctuation, singular for plural, the same letters, one letter off), is a
UserError naming the setting and a fix; other variables (PATH, HOME,
CUDA_VISIBLE_DEVICES, SLURM_*, ...) are none of its business.

    python sweep.py check-settings    # the resolved settings, as shell assignments
    python sweep.py run < TABLE       # run the script's table (what the script ends with)
    python sweep.py status RESULTS    # queued / running / done / failed, run by run
    python sweep.py --help            # every setting: its values, default and use

`check-settings` reads its environment and prints one `NAME=value` line per
setting (shell-quoted, for the script to eval), then what the script reads
from the code with the same interpreter start: the table's schedule length and
run-name tag and every network's name. A bad setting ends it with one line,
`error: ...`, on stderr and exit code 2, before the script has started
anything (also in a dry run). The registered modes, networks and datasets come
from the code, so a new method file joins the sweep's default MODES, and its
checks, by itself. `run` reads the table (one step a line: see "the plan of
runs" below), checks the settings again and prints the commands (DRY_RUN=1)
or gives the table to the executor EXECUTOR names.
"""
import argparse
import functools
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

from errors import ArgumentParser, UserError, cli


@dataclass(frozen=True)
class Table:
    """A comparison table: the defaults of the settings that pick its runs."""
    epochs: int                 # the schedule's length; another EPOCHS names its runs apart (-e<EPOCHS>)
    datasets: str
    pairs: str                  # teacher:student
    dml_pairs: Optional[str]    # net1:net2; None: the same as PAIRS
    tag: str                    # in every run's name, so the tables can share one RESULTS
    # pairs whose KD (st) also runs with --optimizer dot, as its authors' configs do (own folder: st_dot)
    dot_pairs: str = ''


TABLES = {
    'seed': Table(epochs=200, datasets='cifar10 cifar100',
                  pairs='resnet20:resnet20 resnet110:resnet20 resnet110:resnet110', dml_pairs=None, tag=''),
    # The CIFAR-100 benchmark of RepDistiller/mdistiller (Tian et al., CRD, ICLR 2020): its 13 pairs, no DML.
    'crd': Table(epochs=240, datasets='cifar100',
                 pairs='resnet56:resnet20 resnet110:resnet20 resnet110:resnet32 resnet32x4:resnet8x4 '
                       'wrn_40_2:wrn_16_2 wrn_40_2:wrn_40_1 vgg13:vgg8 vgg13:MobileNetV2 '
                       'ResNet50:MobileNetV2 ResNet50:vgg8 resnet32x4:ShuffleV1 resnet32x4:ShuffleV2 '
                       'wrn_40_2:ShuffleV1',
                 dml_pairs='', tag='-crd',
                 # mdistiller configs/cifar100/dot/{res32x4_res8x4,vgg13_vgg8,res32x4_shuv2}.yaml
                 dot_pairs='resnet32x4:resnet8x4 vgg13:vgg8 resnet32x4:ShuffleV2'),
}


@dataclass(frozen=True)
class Registries:
    """The names the code registers, which the settings are checked against."""
    modes: Tuple[str, ...]
    networks: Tuple[str, ...]
    datasets: Tuple[str, ...]
    shareable: Tuple[str, ...]   # the modes that can share one teacher pass (train_kd.py --kd_mode a,b)


@functools.lru_cache(maxsize=None)
def code_registries():
    """The registered KD modes (sorted, as `python -m kd_losses --names`), networks and datasets."""
    import dataset
    import network
    from kd_losses.__main__ import mode_names, sharing
    return Registries(tuple(mode_names()), tuple(network.NETWORKS), tuple(dataset.DATASETS),
                      tuple(mode for mode, reason in sharing().items() if not reason))


# ----------------------------------------------------------------------------- the checks of a value
# Each takes (setting name, value) and returns the value resolved, or raises UserError.

def words(value):
    return value.split()


def no_duplicates(name, entries):
    seen = set()
    for entry in entries:
        if entry in seen:
            raise UserError(f"{name} lists '{entry}' twice (a run would be started twice)")
        seen.add(entry)


def whole_number(name, value, minimum):
    """`value` as a whole number >= minimum, without leading zeros (ASCII digits only; at
    most 18 of them, so the script's shell arithmetic cannot overflow)."""
    if not re.fullmatch(r'[0-9]{1,18}', value) or int(value) < minimum:
        raise UserError(f"{name}: '{value}' is not a whole number >= {minimum}")
    return str(int(value))


def check_whole_number(minimum):
    return lambda name, value: whole_number(name, value, minimum)


def check_whole_numbers(minimum):
    def check(name, value):
        numbers = [whole_number(name, entry, minimum) for entry in words(value)]
        no_duplicates(name, numbers)  # after the leading zeros go: 01 is 1
        return ' '.join(numbers)
    return check


def check_choice(what, choices):
    def check(name, value):
        if value not in choices:
            article = 'an' if what[0] in 'aeiou' else 'a'
            raise UserError(f"{name}: '{value}' is not {article} {what}; {what}s: {' '.join(choices)}")
        return value
    return check


def check_names(what, registry):
    """A list of registered names (`registry`: the Registries field)."""
    def check(name, value):
        entries = words(value)
        no_duplicates(name, entries)
        valid = getattr(code_registries(), registry)
        for entry in entries:
            if entry not in valid:
                raise UserError(f"{name}: unknown {what} '{entry}'; {what}s: {' '.join(valid)}")
        return ' '.join(entries)
    return check


def check_pairs(form):
    """A list of network pairs written `form` (TEACHER:STUDENT, NET1:NET2)."""
    def check(name, value):
        entries = words(value)
        no_duplicates(name, entries)
        for pair in entries:
            if not re.fullmatch(r'[^:]+:[^:]+', pair):
                raise UserError(f"{name}: '{pair}' is not {form} (e.g. resnet110:resnet20)")
            for net in pair.split(':'):
                if net not in code_registries().networks:
                    raise UserError(f"{name}: unknown network '{net}' in {pair}; "
                                    f"networks: {' '.join(code_registries().networks)}")
        return ' '.join(entries)
    return check


# A CUDA_VISIBLE_DEVICES entry: device numbers or GPU-/MIG- UUIDs, comma-separated (a run on several).
GPU_ID = r'(?:[0-9]+|(?:GPU|MIG)-[0-9A-Za-z/-]+)'


def check_gpus(name, value):
    entries = words(value)
    if not entries:
        raise UserError(f'{name} is empty: name at least one GPU (it sets the number of runs at once, '
                        f'also on the CPU)')
    for entry in entries:
        if not re.fullmatch(rf'{GPU_ID}(?:,{GPU_ID})*', entry):
            raise UserError(f"{name}: '{entry}' is not a GPU: a CUDA device number (GPUS=\"0 1\"), a GPU-... "
                            f"or MIG-... UUID, or several for one run joined by commas (GPUS=\"0,1 2,3\")")
    return ' '.join(entries)


YES_NO = {'0': '0', '1': '1', 'no': '0', 'yes': '1', 'false': '0', 'true': '1'}


def check_yes_no(name, value):
    """0/1, no/yes or false/true (any case), as 0 or 1. Anything else is refused,
    also an empty value: a DRY_RUN=$X whose X is unset must not start the real sweep."""
    if value.lower() not in YES_NO:
        raise UserError(f"{name}: '{value}' is not one of {'/'.join(YES_NO)} (any case; "
                        f"{name}=1: {SETTINGS_BY_NAME[name].help})")
    return YES_NO[value.lower()]


def check_not_empty(name, value):
    if not value.strip():
        setting = SETTINGS_BY_NAME[name]
        raise UserError(f'{name} is empty: unset it for {setting.default_help}, or name one')
    return value


def check_any(name, value):
    return value


def check_time_limit(name, value):
    """A SLURM time limit as whole minutes: MINUTES, HOURS:MM:SS or DAYS-HOURS[:MM[:SS]]
    (seconds round up), resolved to minutes."""
    match = re.fullmatch(r'(?:([0-9]{1,3})-)?([0-9]{1,5})(?::([0-5][0-9]))?(?::([0-5][0-9]))?', value.strip())
    if not match:
        raise UserError(f"{name}: '{value}' is not a time limit: minutes (240), hours:minutes:seconds "
                        f"(12:00:00) or days-hours (2-00)")
    days, first, second, third = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        minutes = int(days) * 1440 + int(first) * 60 + int(second or 0) + (int(third or 0) > 0)
    elif third is not None:  # H:M:S
        minutes = int(first) * 60 + int(second) + (int(third) > 0)
    elif second is not None:  # M:S
        minutes = int(first) + (int(second) > 0)
    else:
        minutes = int(first)
    if minutes < 1:
        raise UserError(f"{name}: '{value}' is under a minute")
    return str(minutes)


# sbatch options the sweep sets itself, each from its own setting or from the table
SBATCH_OWN = {'partition': 'PARTITION', 'p': 'PARTITION', 'time': 'TIME_LIMIT', 't': 'TIME_LIMIT',
              'gpus-per-node': 'GPUS_PER_JOB', 'gres': 'GPUS_PER_JOB', 'gpus': 'GPUS_PER_JOB',
              'array': 'MAX_JOBS', 'dependency': 'the table (KD runs wait for their baselines)',
              'output': 'the sweep (RESULTS/slurm/)', 'error': 'the sweep (RESULTS/slurm/)',
              'signal': 'the sweep (a job is warned before its time limit, to requeue)'}


def check_sbatch_options(name, value):
    """sbatch options as --name=value or --name words, none of those the sweep sets itself."""
    for word in words(value):
        match = re.fullmatch(r'--([a-z][a-z0-9-]*)(?:=(.+))?', word)
        if not match:
            raise UserError(f"{name}: '{word}' is not an sbatch option written --name=value or --name "
                            f"(e.g. SBATCH_OPTIONS=\"--account=lab --qos=high\")")
        if match.group(1) in SBATCH_OWN:
            raise UserError(f"{name}: '{word}' is set by {SBATCH_OWN[match.group(1)]}, not here")
    return ' '.join(words(value))


def sbatch_options(value):
    """SBATCH_OPTIONS as submitit's additional_parameters: {'account': 'lab', 'exclusive': True}."""
    options = {}
    for word in words(value):
        key, _, option = word[2:].partition('=')
        options[key.replace('-', '_')] = option if option else True
    return options


def check_students_per_run(name, value):
    return 'all' if value.strip() == 'all' else whole_number(name, value, 1)


def check_directory(name, value):
    """An existing directory, or empty for none."""
    if value and not os.path.isdir(value):
        raise UserError(f"{name}: '{value}' is not a directory ({SETTINGS_BY_NAME[name].help})")
    return value


# ----------------------------------------------------------------------------- the table of settings

def table_default(attribute):
    return lambda resolved: str(getattr(TABLES[resolved['TABLE']], attribute))


def dml_pairs_default(resolved):
    dml_pairs = TABLES[resolved['TABLE']].dml_pairs
    return resolved['PAIRS'] if dml_pairs is None else dml_pairs


@dataclass(frozen=True)
class Setting:
    name: str
    values: str                                     # what it takes, in words
    default: Union[str, Callable[[dict], str]]      # unset: this; a function of the settings above it
    default_help: str
    help: str
    check: Callable[[str, str], str] = check_any
    aliases: Tuple[str, ...] = field(default=())    # other names it may be given by


EXECUTORS = ('local', 'slurm')
# table: every run trains the table's EPOCHS (equal terms); authors: a mode's
# official per-pair length where its authors train a pair longer.
SCHEDULE_CHOICES = ('table', 'authors')

# In the order they are resolved: a default may read the settings above it.
SETTINGS = (
    Setting('TABLE', ' | '.join(TABLES), 'seed', 'seed',
            "the table: seed (the seed's experiments) or crd (the CIFAR-100 benchmark, --protocol crd)",
            check_choice('table', tuple(TABLES))),
    Setting('DATA_ROOT', 'a directory', './datasets', './datasets',
            'where cifar-10-batches-py/ and cifar-100-python/ live (fetched there when missing)',
            check_not_empty),
    Setting('RESULTS', 'a directory', './results', './results',
            'the results root: RESULTS/base/, RESULTS/<mode>/, RESULTS/dml/, RESULTS/logs/',
            check_not_empty),
    Setting('TEACHERS', 'a directory', '', 'none',
            'released CIFAR-100 teachers (RepDistiller or mdistiller layout): used instead of training '
            'the teachers, each checked once by `python teachers.py verify` before it teaches',
            check_directory),
    Setting('GPUS', 'CUDA device numbers (or GPU-/MIG- UUIDs)', '0', '0',
            'the GPUs to use, one per run at a time, as its CUDA_VISIBLE_DEVICES (0,1: two for one run)',
            check_gpus, aliases=('GPU',)),
    Setting('JOBS_PER_GPU', 'a whole number >= 1', '1', '1',
            'runs at once on each GPU (small students leave a GPU idle)', check_whole_number(1)),
    Setting('DATASETS', 'dataset names', table_default('datasets'),
            "the table's (seed: cifar10 cifar100; crd: cifar100)", 'the datasets (empty: none)',
            check_names('dataset', 'datasets')),
    Setting('MODES', 'KD mode names', lambda resolved: ' '.join(code_registries().modes),
            'every registered mode (python -m kd_losses --names)', 'the KD modes (empty: none)',
            check_names('mode', 'modes')),
    Setting('PAIRS', 'TEACHER:STUDENT pairs', table_default('pairs'), "the table's (crd: its 13)",
            'the teacher -> student pairs of the KD runs (empty: none)', check_pairs('TEACHER:STUDENT')),
    Setting('DML_PAIRS', 'NET1:NET2 pairs', dml_pairs_default, 'PAIRS (crd: none)',
            'the DML pairs (empty: none)', check_pairs('NET1:NET2')),
    Setting('SEEDS', 'whole numbers >= 0', '2', '2',
            'one full replicate per seed (the summary gives mean +- std)', check_whole_numbers(0)),
    Setting('EPOCHS', 'a whole number >= 1', table_default('epochs'), "the table's (seed: 200; crd: 240)",
            'the schedule; another length adds -e<EPOCHS> to every run\'s name, so its runs stay apart',
            check_whole_number(1)),
    Setting('SCHEDULES', ' | '.join(SCHEDULE_CHOICES), 'table', 'table',
            'table: every run trains EPOCHS; authors (TABLE=crd): a KD run whose authors train its pair '
            'longer trains their schedule instead, named -e<their epochs> (MLKD: 480 or 960 epochs for '
            'five pairs; python -m kd_losses --own_epochs T S)',
            check_choice('schedule choice', SCHEDULE_CHOICES)),
    Setting('EXTRA_ARGS', 'flags', '', 'none',
            'appended to every command (e.g. "--no_download", "--device cpu")'),
    Setting('KD_ARGS', 'flags', '', 'none', 'appended to the train_kd.py commands (e.g. "--init_epochs 5")'),
    Setting('SHARE_TEACHER', '0/1, no/yes, false/true', '1', '1',
            'the KD runs of one dataset, pair and seed train in one process on one teacher pass '
            '(train_kd.py --kd_mode a,b,...: the same results); 0: one process per run', check_yes_no),
    Setting('STUDENTS_PER_RUN', 'a whole number >= 1, or all', 'all', 'all',
            'with SHARE_TEACHER=1: the most students of one process', check_students_per_run),
    Setting('DRY_RUN', '0/1, no/yes, false/true', '0', '0',
            'print the commands instead of running them; nothing is started or written', check_yes_no),
    Setting('PYTHON', 'a command', 'python', 'python', 'the interpreter of every run', check_not_empty),
    Setting('EXECUTOR', 'local | slurm', 'local', 'local',
            'local: the runs on this machine (GPUS, JOBS_PER_GPU); slurm: job arrays on a SLURM cluster '
            '(through submitit), with the settings below', check_choice('executor', EXECUTORS)),
    Setting('PARTITION', 'a SLURM partition', '', "the cluster's default", 'slurm: the partition of every job'),
    Setting('TIME_LIMIT', 'minutes, H:MM:SS or D-HH', '1440', '1440 (24 hours)',
            'slurm: the time limit of one job; a job that reaches it is requeued and resumes',
            check_time_limit),
    Setting('GPUS_PER_JOB', 'a whole number >= 0', '1', '1',
            'slurm: the GPUs of one job, which runs JOBS_PER_GPU runs on each (0: CPU jobs)',
            check_whole_number(0)),
    Setting('MAX_JOBS', 'a whole number >= 1', '64', '64',
            'slurm: the jobs of one array running at once (the array throttle, --array=...%MAX_JOBS)',
            check_whole_number(1)),
    Setting('SBATCH_OPTIONS', 'sbatch options', '', 'none',
            'slurm: more sbatch options for every job (e.g. "--account=lab --qos=high --mem=16G")',
            check_sbatch_options),
)
# Settings that only the slurm executor reads: given with EXECUTOR=local, one is a mistake.
CLUSTER_SETTINGS = ('PARTITION', 'TIME_LIMIT', 'GPUS_PER_JOB', 'MAX_JOBS', 'SBATCH_OPTIONS')
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
KNOWN_NAMES = {name: s for s in SETTINGS for name in (s.name, *s.aliases)}


# ----------------------------------------------------------------------------- misspelt settings

def normalised(name):
    """The letters and digits of a variable's name, upper case: modes, Modes and MODES_ are one."""
    return re.sub(r'[^A-Z0-9]', '', name.upper())


def edit_distance(a, b):
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def looks_like(variable, setting_name):
    """Whether the environment variable `variable` reads as a misspelling of `setting_name`.

    Near misses only, so that no common variable trips it (HOME is two letters
    from MODES, CPUS one from GPUS): the same name in another case or
    punctuation (modes, DMLPAIRS), singular for plural or back (MODE, TABLES),
    the same letters in another order (MDOES); for names of 5 or more letters a
    letter left out (MODS, SEDS), for 6 or more also one letter added or
    changed (EPOCS, DATASETZ)."""
    candidate, setting = normalised(variable), normalised(setting_name)
    if not candidate:
        return False
    if candidate == setting or candidate + 'S' == setting or candidate == setting + 'S':
        return True
    if len(setting) >= 4 and sorted(candidate) == sorted(setting):
        return True
    if len(setting) >= 6:
        return edit_distance(candidate, setting) <= 1
    return (len(setting) >= 5 and len(candidate) == len(setting) - 1
            and any(setting[:i] + setting[i + 1:] == candidate for i in range(len(setting))))


def misspelt_setting(variable):
    """The setting `variable` looks like a misspelling of (the nearest), or None."""
    if variable in KNOWN_NAMES:
        return None
    near = [(edit_distance(normalised(variable), normalised(name)), i, s.name)
            for i, s in enumerate(SETTINGS) for name in (s.name, *s.aliases) if looks_like(variable, name)]
    return min(near)[2] if near else None


def check_no_misspelt_settings(environ):
    for variable in sorted(environ):
        setting = misspelt_setting(variable)
        if setting:
            raise UserError(f'{variable} is not a setting of the sweep: did you mean {setting}? '
                            f'(unset {variable} if it is meant for something else; '
                            f'python sweep.py --help lists the settings)')


# ----------------------------------------------------------------------------- resolving an environment

def check_settings(environ: Mapping[str, str]) -> Dict[str, str]:
    """{setting: resolved value} of every setting in `environ` (unset: the default).

    Raises UserError for an environment variable that looks like a misspelt
    setting, for a setting given by two names that disagree, then for the first
    setting (in the table's order) whose value is not allowed."""
    check_no_misspelt_settings(environ)
    resolved = {}
    for setting in SETTINGS:
        given = [(name, environ[name]) for name in (setting.name, *setting.aliases) if name in environ]
        if len({tuple(words(value)) for _, value in given}) > 1:
            (name, value), (alias, other) = given[:2]
            raise UserError(f"{name}='{value}' and {alias}='{other}' disagree: {alias} is another name "
                            f"of {name}; set one of them")
        if given:
            value = given[0][1]
        elif callable(setting.default):
            value = setting.default(resolved)
        else:
            value = setting.default
        resolved[setting.name] = setting.check(setting.name, value)
    check_together(environ, resolved)
    return resolved


def check_together(environ, resolved):
    """The rules between settings."""
    if resolved['EXECUTOR'] != 'slurm':
        for name in CLUSTER_SETTINGS:
            if name in environ:
                raise UserError(f'{name} is a setting of EXECUTOR=slurm (EXECUTOR is {resolved["EXECUTOR"]}): '
                                f'set EXECUTOR=slurm, or unset {name}')
    if resolved['SCHEDULES'] == 'authors':
        default = str(TABLES[resolved['TABLE']].epochs)
        if resolved['TABLE'] != 'crd' or resolved['EPOCHS'] != default:
            raise UserError(f"SCHEDULES=authors gives the CIFAR-100 benchmark's KD runs their authors' "
                            f"per-pair lengths: it needs TABLE=crd and EPOCHS at the table's "
                            f"{TABLES['crd'].epochs} (TABLE is {resolved['TABLE']}, EPOCHS {resolved['EPOCHS']})")
    if resolved['TEACHERS'] and set(words(resolved['DATASETS'])) - {'cifar100'}:
        raise UserError(f"TEACHERS: released teachers are CIFAR-100 networks, but DATASETS is "
                        f"'{resolved['DATASETS']}': set DATASETS=cifar100 (TABLE=crd has it)")


# ----------------------------------------------------------------------------- the plan of runs
# The script hands the table to `sweep.py run` on stdin, one step a line, each
# word quoted as bash's printf %q quotes it:
#     run DIR [--needs ROLE DIR]... -- COMMAND...     a training run, in its directory
#     check NAME [--needs ROLE DIR]... -- COMMAND...  a command that must pass before the runs that need it
#     note TEXT                                      a line to print where it stands (a skipped mode)
#     end                                            the table is complete
# A run needs other runs finished (their complete.json) or checks passed; the
# executors decide the rest from the run directories alone, at the moment a
# run starts: finished (complete.json) is skipped, a checkpoint is resumed, a
# directory without one started again.

@dataclass
class Step:
    kind: str                               # 'run', 'check' or 'note'
    name: str                               # run: its directory; check: its name; note: the text
    needs: Tuple[Tuple[str, str], ...] = ()  # (role, run directory or check name), e.g. ('teacher', DIR)
    command: Tuple[str, ...] = ()
    shown: Tuple[str, ...] = ()              # the command's words quoted as the table quoted them
    # a shared run (train_kd.py --kd_mode a,b,...): its students' run directories, in its folder `name`
    students: Tuple[str, ...] = ()

    @property
    def done(self):
        """A run is done when its complete.json exists; a shared run when each of its students' does."""
        return all(finished(d) for d in self.students) if self.students else finished(self.name)

    @property
    def restart_flags(self):
        """The flags it starts with (restart_flag): a shared run whose students
        have begun --resume (the process starts afresh each student without a
        checkpoint, and leaves the finished ones as they are)."""
        if self.students:
            return ('--resume',) if any(os.path.isdir(d) for d in self.students) else ()
        return restart_flag(self.name)

    @property
    def label(self):
        """The name in logs and reports: a run's directory name, a check's name."""
        return os.path.basename(self.name.rstrip('/')) if self.kind == 'run' else self.name


# One word as printf %q writes it: $'...' (control characters), '...', backslash escapes, plain characters.
QUOTED_WORD = re.compile(r"""(?:\$'(?:[^'\\]|\\.)*'|'[^']*'|\\.|[^\s\\'$]|\$)+""", re.S)
ANSI_C_PART = re.compile(r"""\$'((?:[^'\\]|\\.)*)'""", re.S)


def unquote(word):
    """The string a shell word stands for (printf %q's quoting, $'...' included)."""
    parts, last = [], 0
    for match in ANSI_C_PART.finditer(word):
        parts += shlex.split(word[last:match.start()]) if word[last:match.start()] else []
        parts.append(match.group(1).encode('latin-1', 'backslashreplace').decode('unicode_escape'))
        last = match.end()
    rest = word[last:]
    if rest:
        parts += shlex.split(rest) or ['']
    return ''.join(parts)


def parse_step(line, number):
    quoted = QUOTED_WORD.findall(line)
    words_ = [unquote(w) for w in quoted]
    kind = words_[0] if words_ else ''
    if kind == 'note' and len(words_) == 2:
        return Step('note', words_[1])
    if kind not in ('run', 'check') or '--' not in words_ or words_.index('--') < 2:
        raise UserError(f"the table's line {number} is not a step (run/check NAME [--needs ROLE NAME]... "
                        f"-- COMMAND, or note TEXT): {line[:80]}")
    split = words_.index('--')
    name, options, command = words_[1], words_[2:split], tuple(words_[split + 1:])
    needs, students = [], []
    while options:
        if options[0] == '--student' and len(options) >= 2:
            students.append(options[1])
            options = options[2:]
            continue
        if options[0] != '--needs' or len(options) < 3:
            raise UserError(f"the table's line {number}: '{' '.join(options)}' is not --needs ROLE NAME "
                            f"or --student DIR")
        needs.append((options[1], options[2]))
        options = options[3:]
    if not command:
        raise UserError(f"the table's line {number}: {kind} {name} has no command")
    return Step(kind, name, tuple(needs), command, tuple(quoted[split + 1:]), tuple(students))


def read_plan(text):
    """The steps of the table `text` (the script's output). A table that does not
    end with `end` was cut short (the script failed while writing it): refused."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[-1].strip() != 'end':
        raise UserError("the table of runs did not come complete (no 'end' line): nothing was started")
    steps = [parse_step(line, number) for number, line in enumerate(lines[:-1], 1)]
    seen = set()
    for step in steps:
        if step.kind != 'note':
            if step.name in seen:
                raise UserError(f'the table lists {step.name} twice (a run would be started twice)')
            seen.add(step.name)
    return steps


def finished(run_dir):
    """A run is finished when its complete.json exists (written after its last checkpoint, only then)."""
    return os.path.isfile(os.path.join(run_dir, 'complete.json'))


def restart_flag(run_dir):
    """How a run that is not finished starts: --resume from its checkpoint, --overwrite
    a directory stopped before its first checkpoint, nothing for a new one."""
    if os.path.isfile(os.path.join(run_dir, 'checkpoint.pth.tar')):
        return ('--resume',)
    return ('--overwrite',) if os.path.isdir(run_dir) else ()


def runs_on_gpu(command, cuda_count):
    """Whether `command` runs on a GPU: the last --device (or --cuda) it is given, else
    CUDA when the machine has a device."""
    on, previous = cuda_count > 0, None
    for word in command:
        if (previous, word) in (('--device', 'cpu'), ('--cuda', '0')) or word == '--device=cpu':
            on = False
        elif (previous == '--device' and word.startswith('cuda')) or (previous, word) == ('--cuda', '1') \
                or word.startswith('--device=cuda'):
            on = True
        previous = word
    return on


def last_error_line(path):
    """The last `error: ...` line a run wrote to `path` (its one-line reason), or ''."""
    try:
        with open(path, errors='replace') as f:
            errors_ = [line.rstrip('\n') for line in f if line.startswith('error: ')]
    except OSError:
        return ''
    return errors_[-1] if errors_ else ''


def cuda_device_count():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ----------------------------------------------------------------------------- the command line

def script_values(environ):
    """What `check-settings` prints: the settings resolved, then the table's
    schedule length and run-name tag and the registered networks (the script names
    their initial-weights files)."""
    settings = check_settings(environ)
    table = TABLES[settings['TABLE']]
    return {**settings, 'DEFAULT_EPOCHS': str(table.epochs), 'TAG': table.tag, 'DOT_PAIRS': table.dot_pairs,
            'ALL_NETWORKS': ' '.join(code_registries().networks),
            'SHAREABLE': ' '.join(code_registries().shareable)}


def print_plan(steps):
    """A dry run: each step's command as the table quoted it (a run with the
    --resume or --overwrite it would get), a finished run as skipped, the notes."""
    for step in steps:
        if step.kind == 'note':
            print(step.name)
        elif step.kind == 'run' and step.done:
            print(f'# done, skipped: {step.name}')
        else:
            flags = step.restart_flags if step.kind == 'run' else ()
            print(' '.join(step.shown + flags) + ' ')


def slurm_executor():
    """sweep_slurm, whose submitit is an optional dependency: a one-line error
    naming the requirements file where it is not installed."""
    try:
        import submitit  # noqa: F401  (only checked here: sweep_slurm imports it)
    except ImportError:
        raise UserError('EXECUTOR=slurm and `sweep.py status` need submitit: '
                        'pip install -r requirements-cluster.txt') from None
    import sweep_slurm
    return sweep_slurm


def run_table(text, environ):
    """`sweep.py run`: the table (the script's output) run by the executor the
    settings name, or printed (DRY_RUN=1). Returns the exit code."""
    settings = check_settings(environ)
    steps = read_plan(text)
    if settings['DRY_RUN'] == '1':
        print_plan(steps)
        if settings['EXECUTOR'] == 'slurm':
            slurm_executor().describe(steps, settings)
        return 0
    if settings['EXECUTOR'] == 'slurm':
        slurm_executor().submit(steps, settings)
        return 0
    import sweep_local
    return sweep_local.run_sweep(steps, settings)


def settings_help():
    lines = ['settings (environment variables; unset takes the default, an empty list means none):']
    for s in SETTINGS:
        also = f' (also {", ".join(s.aliases)})' if s.aliases else ''
        lines += [f'  {s.name}{also}: {s.values}; default {s.default_help}', f'      {s.help}']
    return '\n'.join(lines)


@cli
def main(argv=None):
    parser = ArgumentParser(prog='sweep.py', description=__doc__.split('\n\n')[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=settings_help())
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    commands.add_parser('check-settings', help='check the settings in the environment and print them '
                                               'resolved, as shell assignments (what the script evals)')
    commands.add_parser('run', help="run the table of runs read from stdin (the script's output) with "
                                    "the settings in the environment")
    status = commands.add_parser('status', help="list a results root's runs: queued, running, done, failed "
                                                "(from the cluster too, after EXECUTOR=slurm)")
    status.add_argument('results', metavar='RESULTS')
    args = parser.parse_args(argv)
    if args.command == 'check-settings':
        for name, value in script_values(os.environ).items():
            print(f'{name}={shlex.quote(value)}')
    elif args.command == 'run':
        code = run_table(sys.stdin.read(), os.environ)
        if code:
            raise SystemExit(code)
    elif args.command == 'status':
        for line in slurm_executor().status_lines(args.results):
            print(line)


if __name__ == '__main__':
    main()
