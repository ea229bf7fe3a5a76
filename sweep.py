"""The settings of the sweep (example_train_script.sh): the one table of them,
their check, and the command the script starts with.

The sweep is told what to run by environment variables (TABLE, MODES, EPOCHS,
DRY_RUN, ...). `SETTINGS` lists each one: its name, the values it takes, its
default and what it does. `check_settings` resolves an environment against it:
an unset setting takes its default (some depend on TABLE), lists come out
single-spaced, whole numbers without leading zeros, DRY_RUN as 0 or 1. A value
that is not allowed, or an environment variable that looks like a misspelt
setting (`MODE`, `EPOCH`, `modes`, `DMLPAIRS`, `EPOHCS`: another case or
punctuation, singular for plural, the same letters, one letter off), is a
UserError naming the setting and a fix; other variables (PATH, HOME,
CUDA_VISIBLE_DEVICES, SLURM_*, ...) are none of its business.

    python sweep.py check-settings    # the resolved settings, as shell assignments
    python sweep.py --help            # every setting: its values, default and use

`check-settings` reads its environment and prints one `NAME=value` line per
setting (shell-quoted, for the script to eval), then what the script reads
from the code with the same interpreter start: the table's schedule length and
run-name tag, every network's name and the number of CUDA devices. A bad
setting ends it with one line, `error: ...`, on stderr and exit code 2, before
the script has started anything (also in a dry run). The registered modes,
networks and datasets come from the code, so a new method file joins the
sweep's default MODES, and its checks, by itself.
"""
import argparse
import functools
import os
import re
import shlex
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


TABLES = {
    'seed': Table(epochs=200, datasets='cifar10 cifar100',
                  pairs='resnet20:resnet20 resnet110:resnet20 resnet110:resnet110', dml_pairs=None, tag=''),
    # The CIFAR-100 benchmark of RepDistiller/mdistiller (Tian et al., CRD, ICLR 2020): its 13 pairs, no DML.
    'crd': Table(epochs=240, datasets='cifar100',
                 pairs='resnet56:resnet20 resnet110:resnet20 resnet110:resnet32 resnet32x4:resnet8x4 '
                       'wrn_40_2:wrn_16_2 wrn_40_2:wrn_40_1 vgg13:vgg8 vgg13:MobileNetV2 '
                       'ResNet50:MobileNetV2 ResNet50:vgg8 resnet32x4:ShuffleV1 resnet32x4:ShuffleV2 '
                       'wrn_40_2:ShuffleV1',
                 dml_pairs='', tag='-crd'),
}


@dataclass(frozen=True)
class Registries:
    """The names the code registers, which the settings are checked against."""
    modes: Tuple[str, ...]
    networks: Tuple[str, ...]
    datasets: Tuple[str, ...]


@functools.lru_cache(maxsize=None)
def code_registries():
    """The registered KD modes (sorted, as `python -m kd_losses --names`), networks and datasets."""
    import dataset
    import network
    from kd_losses.__main__ import mode_names
    return Registries(tuple(mode_names()), tuple(network.NETWORKS), tuple(dataset.DATASETS))


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
            raise UserError(f"{name}: '{value}' is not a {what}; {what}s: {' '.join(choices)}")
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
    Setting('EXTRA_ARGS', 'flags', '', 'none',
            'appended to every command (e.g. "--no_download", "--device cpu")'),
    Setting('KD_ARGS', 'flags', '', 'none', 'appended to the train_kd.py commands (e.g. "--init_epochs 5")'),
    Setting('DRY_RUN', '0/1, no/yes, false/true', '0', '0',
            'print the commands instead of running them; nothing is started or written', check_yes_no),
    Setting('PYTHON', 'a command', 'python', 'python', 'the interpreter of every run', check_not_empty),
)
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
    return resolved


# ----------------------------------------------------------------------------- the command line

def script_values(environ):
    """What `check-settings` prints: the settings resolved, then the table's
    schedule length and run-name tag, the registered networks (the script names
    their initial-weights files) and the number of CUDA devices (whether a run
    goes to a GPU)."""
    import torch
    settings = check_settings(environ)
    table = TABLES[settings['TABLE']]
    return {**settings, 'DEFAULT_EPOCHS': str(table.epochs), 'TAG': table.tag,
            'ALL_NETWORKS': ' '.join(code_registries().networks),
            'CUDA_COUNT': str(torch.cuda.device_count() if torch.cuda.is_available() else 0)}


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
    args = parser.parse_args(argv)
    if args.command == 'check-settings':
        for name, value in script_values(os.environ).items():
            print(f'{name}={shlex.quote(value)}')


if __name__ == '__main__':
    main()
