"""The sweep's settings (sweep.py): their defaults per table, the check of each
value, the refusal of a variable that looks like a misspelt setting (and of
none of the variables a real environment has), the `check-settings` command the
script evals, and the script's list of settings agreeing with the table."""
import os
import re
import subprocess
import sys

import pytest

import sweep
from errors import UserError
from kd_losses import METHODS
from network import NETWORKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'example_train_script.sh')


def refused(environ):
    with pytest.raises(UserError) as e:
        sweep.check_settings(environ)
    message = str(e.value)
    assert '\n' not in message
    return message


# ----------------------------------------------------------------------------- defaults

def test_the_defaults_are_the_seed_table_and_the_crd_table():
    seed = sweep.check_settings({})
    pairs = 'resnet20:resnet20 resnet110:resnet20 resnet110:resnet110'
    assert seed == {
        'TABLE': 'seed', 'DATA_ROOT': './datasets', 'RESULTS': './results', 'TEACHERS': '', 'GPUS': '0',
        'JOBS_PER_GPU': '1', 'DATASETS': 'cifar10 cifar100', 'MODES': ' '.join(sorted(METHODS)), 'PAIRS': pairs,
        'DML_PAIRS': pairs, 'SEEDS': '2', 'EPOCHS': '200', 'SCHEDULES': 'table', 'EXTRA_ARGS': '',
        'KD_ARGS': '', 'SHARE_TEACHER': '1', 'STUDENTS_PER_RUN': 'all', 'DRY_RUN': '0',
        'PYTHON': 'python', 'EXECUTOR': 'local', 'PARTITION': '', 'TIME_LIMIT': '1440', 'GPUS_PER_JOB': '1',
        'MAX_JOBS': '64', 'SBATCH_OPTIONS': ''}
    crd = sweep.check_settings({'TABLE': 'crd'})
    assert (crd['DATASETS'], crd['EPOCHS'], crd['DML_PAIRS']) == ('cifar100', '240', '')
    assert len(crd['PAIRS'].split()) == 13
    # DML_PAIRS follows the PAIRS given; an empty list is none, not the default
    given = sweep.check_settings({'PAIRS': 'resnet56:resnet20', 'MODES': '', 'DATASETS': ''})
    assert (given['DML_PAIRS'], given['MODES'], given['DATASETS']) == ('resnet56:resnet20', '', '')


def test_values_are_resolved_as_the_script_reads_them():
    got = sweep.check_settings({'SEEDS': ' 01\t3 ', 'EPOCHS': '007', 'MODES': 'st  at', 'GPU': '1',
                                'EXTRA_ARGS': '--device cpu'})
    assert (got['SEEDS'], got['EPOCHS'], got['MODES'], got['GPUS']) == ('1 3', '7', 'st at', '1')
    assert got['EXTRA_ARGS'] == '--device cpu'
    assert sweep.check_settings({'GPU': '1', 'GPUS': '1'})['GPUS'] == '1'  # both, agreeing


@pytest.mark.parametrize('value, dry', [('0', '0'), ('1', '1'), ('no', '0'), ('yes', '1'), ('false', '0'),
                                        ('true', '1'), ('TRUE', '1'), ('No', '0')])
def test_dry_run_is_a_yes_or_no(value, dry):
    assert sweep.check_settings({'DRY_RUN': value})['DRY_RUN'] == dry


@pytest.mark.parametrize('value, minutes', [('90', '90'), ('1:30:00', '90'), ('0:00:01', '1'), ('2-00', '2880'),
                                            ('1-12:30', '2190'), (' 45 ', '45')])
def test_time_limits_are_slurm_forms_resolved_to_minutes(value, minutes):
    assert sweep.check_settings({'EXECUTOR': 'slurm', 'TIME_LIMIT': value})['TIME_LIMIT'] == minutes


def test_sbatch_options_become_submitits_extra_parameters():
    value = sweep.check_settings({'EXECUTOR': 'slurm', 'SBATCH_OPTIONS': ' --account=lab  --exclusive '
                                                                          '--mem-per-cpu=4G'})['SBATCH_OPTIONS']
    assert sweep.sbatch_options(value) == {'account': 'lab', 'exclusive': True, 'mem_per_cpu': '4G'}


@pytest.mark.parametrize('gpus', ['0 1', '0,1 2,3', 'GPU-8932f937-d72c-4106-c12f-20bd9faed9f6',
                                  'MIG-GPU-8932f937-d72c-4106-c12f-20bd9faed9f6/1/0 3'])
def test_gpus_are_what_cuda_visible_devices_takes(gpus):
    assert sweep.check_settings({'GPUS': gpus})['GPUS'] == gpus


# ----------------------------------------------------------------------------- bad values

BAD_VALUES = [  # (environment, what the message starts with, what else it names)
    ({'DRY_RUN': ''}, "DRY_RUN: ''", ['0/1/no/yes/false/true']),  # DRY_RUN=$UNSET: not a real sweep
    ({'DRY_RUN': 'y'}, "DRY_RUN: 'y'", ['0/1/no/yes/false/true']),
    ({'DRY_RUN': '2'}, "DRY_RUN: '2'", ['0/1/no/yes/false/true']),
    ({'GPUS': 'cuda:0'}, "GPUS: 'cuda:0'", ['CUDA device number']),
    ({'GPUS': '0 -1'}, "GPUS: '-1'", ['CUDA device number']),
    ({'GPUS': ' '}, 'GPUS is empty', ['at least one GPU']),
    ({'GPU': ''}, 'GPUS is empty', ['at least one GPU']),
    ({'GPU': '1', 'GPUS': '0 1'}, "GPUS='0 1' and GPU='1' disagree", ['set one of them']),
    ({'RESULTS': ''}, 'RESULTS is empty', ['./results']),  # not the root directory
    ({'DATA_ROOT': ''}, 'DATA_ROOT is empty', ['./datasets']),
    ({'PYTHON': ''}, 'PYTHON is empty', ['python']),
    ({'EPOCHS': '0'}, "EPOCHS: '0'", ['whole number >= 1']),
    ({'EPOCHS': '-5'}, "EPOCHS: '-5'", ['whole number >= 1']),
    ({'EPOCHS': '٣'}, "EPOCHS: '٣'", ['whole number']),  # a digit, but not one the shell counts with
    ({'EPOCHS': '1' * 19}, 'EPOCHS: ', ['whole number']),  # past the shell's arithmetic
    ({'SEEDS': '-1'}, "SEEDS: '-1'", ['whole number >= 0']),
    ({'TABLE': 'CRD'}, "TABLE: 'CRD' is not a table", ['seed crd']),
    ({'MODES': 'ST'}, "MODES: unknown mode 'ST'", [' '.join(sorted(METHODS))]),
    ({'DATASETS': 'cifar10 mnist'}, "DATASETS: unknown dataset 'mnist'", ['cifar10 cifar100']),
    ({'DML_PAIRS': 'resnet20:'}, "DML_PAIRS: 'resnet20:' is not NET1:NET2", []),
    ({'TABLE': 'crd', 'PAIRS': 'wrn_40_2:wrn_40_3'}, "PAIRS: unknown network 'wrn_40_3' in wrn_40_2:wrn_40_3",
     [' '.join(NETWORKS)]),
    # the executors' settings
    ({'EXECUTOR': 'pbs'}, "EXECUTOR: 'pbs' is not an executor", ['local slurm']),
    ({'PARTITION': 'gpu'}, 'PARTITION is a setting of EXECUTOR=slurm (EXECUTOR is local)', ['unset PARTITION']),
    ({'EXECUTOR': 'local', 'MAX_JOBS': '4'}, 'MAX_JOBS is a setting of EXECUTOR=slurm', []),
    ({'EXECUTOR': 'slurm', 'TIME_LIMIT': '2h'}, "TIME_LIMIT: '2h' is not a time limit", ['12:00:00']),
    ({'EXECUTOR': 'slurm', 'TIME_LIMIT': '0'}, "TIME_LIMIT: '0' is under a minute", []),
    ({'EXECUTOR': 'slurm', 'TIME_LIMIT': '1:75:00'}, "TIME_LIMIT: '1:75:00' is not a time limit", []),
    ({'EXECUTOR': 'slurm', 'GPUS_PER_JOB': '-1'}, "GPUS_PER_JOB: '-1'", ['whole number >= 0']),
    ({'EXECUTOR': 'slurm', 'MAX_JOBS': '0'}, "MAX_JOBS: '0'", ['whole number >= 1']),
    ({'EXECUTOR': 'slurm', 'SBATCH_OPTIONS': 'account=lab'}, "SBATCH_OPTIONS: 'account=lab' is not an sbatch "
     "option", ['--name=value']),
    ({'EXECUTOR': 'slurm', 'SBATCH_OPTIONS': '--qos=high --time=60'}, "SBATCH_OPTIONS: '--time=60' is set by "
     "TIME_LIMIT", []),
    ({'EXECUTOR': 'slurm', 'SBATCH_OPTIONS': '--array=0-3'}, "SBATCH_OPTIONS: '--array=0-3' is set by MAX_JOBS", []),
    ({'TEACHERS': '/no/such/folder'}, "TEACHERS: '/no/such/folder' is not a directory", ['released']),
    ({'TEACHERS': '.', 'DATASETS': 'cifar10'}, 'TEACHERS: released teachers are CIFAR-100 networks',
     ['DATASETS=cifar100']),
]


@pytest.mark.parametrize('environ, starts, named', BAD_VALUES, ids=[str(e) for e, _, _ in BAD_VALUES])
def test_a_bad_value_names_the_setting_and_what_it_takes(environ, starts, named):
    message = refused(environ)
    assert message.startswith(starts), message
    for text in named:
        assert text in message, (text, message)


# ----------------------------------------------------------------------------- misspelt settings

NEAR_MISSES = [  # (variable, the setting it is taken for)
    ('MODE', 'MODES'), ('modes', 'MODES'), ('Modes', 'MODES'), ('MDOES', 'MODES'), ('MODS', 'MODES'),
    ('EPOCH', 'EPOCHS'), ('epochs', 'EPOCHS'), ('EPOHCS', 'EPOCHS'), ('EPOCS', 'EPOCHS'),
    ('SEED', 'SEEDS'), ('seeds', 'SEEDS'), ('GPUs', 'GPUS'), ('gpu', 'GPUS'), ('DATASET', 'DATASETS'),
    ('DATSETS', 'DATASETS'), ('PAIR', 'PAIRS'), ('DMLPAIRS', 'DML_PAIRS'), ('DML_PAIR', 'DML_PAIRS'),
    ('dml_pairs', 'DML_PAIRS'), ('TABLES', 'TABLE'), ('table', 'TABLE'), ('RESULT', 'RESULTS'),
    ('DATAROOT', 'DATA_ROOT'), ('JOBS_PER_GPUS', 'JOBS_PER_GPU'), ('JOB_PER_GPU', 'JOBS_PER_GPU'),
    ('EXTRA_ARG', 'EXTRA_ARGS'), ('KDARGS', 'KD_ARGS'), ('DRYRUN', 'DRY_RUN'), ('dry_run', 'DRY_RUN'),
    ('DRY_RUNS', 'DRY_RUN'), ('python', 'PYTHON'),
]


@pytest.mark.parametrize('variable, setting', NEAR_MISSES, ids=[v for v, _ in NEAR_MISSES])
def test_a_near_miss_of_a_setting_is_refused_naming_the_setting(variable, setting):
    message = refused({variable: '3'})
    assert message.startswith(f'{variable} is not a setting of the sweep: did you mean {setting}? '), message
    assert f'unset {variable}' in message  # the fix, when it is meant for something else


# Variables of real environments: shells, desktops and macOS, compilers, Python and conda, CUDA and
# the ML libraries, distributed launchers, SLURM, PBS, LSF and SGE jobs, CI services, containers.
REALISTIC_ENVIRONMENT = '''
PATH HOME USER LOGNAME SHELL TERM LANG LANGUAGE LC_ALL LC_CTYPE LC_MESSAGES LC_NUMERIC LC_TIME PWD
OLDPWD SHLVL HOSTNAME HOSTTYPE OSTYPE MACHTYPE MAIL MAILCHECK EDITOR VISUAL PAGER LESS LESSOPEN
LESSCLOSE LS_COLORS TMPDIR TMP TEMP TZ DISPLAY WAYLAND_DISPLAY XAUTHORITY XDG_RUNTIME_DIR
XDG_SESSION_ID XDG_SESSION_TYPE XDG_CONFIG_HOME XDG_DATA_HOME XDG_CACHE_HOME XDG_DATA_DIRS
XDG_CONFIG_DIRS DBUS_SESSION_BUS_ADDRESS SSH_AUTH_SOCK SSH_AGENT_PID SSH_CLIENT SSH_CONNECTION SSH_TTY
HISTFILE HISTSIZE HISTFILESIZE HISTCONTROL PS1 PS2 PS4 PROMPT_COMMAND COLUMNS LINES COLORTERM
TERM_PROGRAM TERM_PROGRAM_VERSION TMUX TMUX_PANE STY WINDOW _ MANPATH INFOPATH SUDO_USER SUDO_UID
SUDO_GID SUDO_COMMAND MODULEPATH MODULESHOME LOADEDMODULES _LMFILES_ LMOD_CMD BASH_ENV ENV CDPATH
INPUTRC http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY ALL_PROXY ftp_proxy
__CF_USER_TEXT_ENCODING SECURITYSESSIONID COMMAND_MODE XPC_FLAGS XPC_SERVICE_NAME HOMEBREW_PREFIX
HOMEBREW_CELLAR HOMEBREW_REPOSITORY CC CXX CPP LD AR NM CFLAGS CXXFLAGS CPPFLAGS LDFLAGS LIBRARY_PATH
LD_LIBRARY_PATH LD_PRELOAD PKG_CONFIG_PATH CPATH C_INCLUDE_PATH MAKEFLAGS JAVA_HOME GOPATH GOROOT
CARGO_HOME RUSTUP_HOME NVM_DIR NODE_PATH PYTHONPATH PYTHONHOME PYTHONUNBUFFERED PYTHONDONTWRITEBYTECODE
PYTHONIOENCODING PYTHONHASHSEED PYTHONWARNINGS PYTHONSTARTUP PYTHONUSERBASE PYTHONNOUSERSITE
PYTHONBREAKPOINT PYTHONFAULTHANDLER PYTHONUTF8 PYTHONPYCACHEPREFIX PYTHONOPTIMIZE PYTHON_VERSION
PYTHON_SHA256 PYTHON_GET_PIP_URL GPG_KEY VIRTUAL_ENV VIRTUAL_ENV_PROMPT PIP_INDEX_URL PIP_EXTRA_INDEX_URL
PIP_NO_CACHE_DIR PIP_CACHE_DIR PYENV_ROOT PYENV_VERSION PYTEST_ADDOPTS PYTEST_CURRENT_TEST
PYTEST_XDIST_WORKER PYTEST_XDIST_WORKER_COUNT CONDA_PREFIX CONDA_DEFAULT_ENV CONDA_EXE CONDA_PYTHON_EXE
CONDA_SHLVL CONDA_PROMPT_MODIFIER _CE_M _CE_CONDA CONDA_PKGS_DIRS MAMBA_ROOT_PREFIX MAMBA_EXE
CUDA_VISIBLE_DEVICES CUDA_HOME CUDA_PATH CUDA_DEVICE_ORDER CUDA_LAUNCH_BLOCKING CUDA_VERSION
CUDNN_VERSION CUBLAS_WORKSPACE_CONFIG NVIDIA_VISIBLE_DEVICES NVIDIA_DRIVER_CAPABILITIES
NVIDIA_REQUIRE_CUDA NV_CUDA_LIB_VERSION NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_P2P_DISABLE
NCCL_VERSION TORCH_HOME TORCH_CUDA_ARCH_LIST TORCH_DISTRIBUTED_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING
TORCHINDUCTOR_CACHE_DIR PYTORCH_CUDA_ALLOC_CONF OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS
NUMEXPR_NUM_THREADS KMP_AFFINITY TF_CPP_MIN_LOG_LEVEL HF_HOME HF_DATASETS_CACHE TRANSFORMERS_CACHE
WANDB_API_KEY WANDB_PROJECT WANDB_MODE WANDB_DIR WANDB_ENTITY MLFLOW_TRACKING_URI MPLBACKEND
MASTER_ADDR MASTER_PORT WORLD_SIZE RANK LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK
TORCHELASTIC_RUN_ID ROCR_VISIBLE_DEVICES HIP_VISIBLE_DEVICES GPU_DEVICE_ORDINAL XLA_FLAGS JAX_PLATFORMS
SLURM_JOB_ID SLURM_JOBID SLURM_JOB_NAME SLURM_JOB_NODELIST SLURM_NODELIST SLURM_JOB_NUM_NODES
SLURM_NNODES SLURM_NTASKS SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK SLURM_CPUS_ON_NODE SLURM_GPUS
SLURM_GPUS_ON_NODE SLURM_GPUS_PER_NODE SLURM_JOB_GPUS SLURM_STEP_GPUS SLURM_PROCID SLURM_LOCALID
SLURM_NODEID SLURM_SUBMIT_DIR SLURM_SUBMIT_HOST SLURM_JOB_PARTITION SLURM_ARRAY_TASK_ID
SLURM_ARRAY_JOB_ID SLURM_MEM_PER_NODE SLURM_CLUSTER_NAME SLURM_TASKS_PER_NODE SLURM_CONF
SLURMD_NODENAME PBS_JOBID PBS_JOBNAME PBS_NODEFILE PBS_O_WORKDIR PBS_O_HOME PBS_O_PATH PBS_QUEUE
PBS_ARRAY_INDEX PBS_NUM_NODES PBS_NUM_PPN PBS_ENVIRONMENT NCPUS LSB_JOBID LSB_HOSTS LSB_MCPU_HOSTS
LSB_DJOB_NUMPROC LSB_JOBNAME LSF_ENVDIR JOB_ID JOB_NAME SGE_TASK_ID NSLOTS NHOSTS QUEUE SGE_ROOT
PE_HOSTFILE CI GITHUB_ACTIONS GITHUB_WORKSPACE GITHUB_SHA GITHUB_REF GITHUB_RUN_ID GITHUB_TOKEN
RUNNER_OS RUNNER_TEMP GITLAB_CI CI_JOB_ID CI_PROJECT_DIR CI_COMMIT_SHA TRAVIS JENKINS_HOME BUILD_NUMBER
BUILD_ID WORKSPACE KUBERNETES_SERVICE_HOST KUBERNETES_SERVICE_PORT container DEBIAN_FRONTEND
VSCODE_PID GIT_ASKPASS GIT_EDITOR GIT_PAGER JUPYTER_PATH JPY_PARENT_PID WSL_DISTRO_NAME WSLENV
CPUS NODES MODEL SECONDS RANDOM DATA_DIR DATASET_DIR OUTPUT_DIR RESULTS_DIR CHECKPOINT_DIR
'''.split()


def test_a_realistic_environment_passes():
    flagged = {v: sweep.misspelt_setting(v) for v in REALISTIC_ENVIRONMENT if sweep.misspelt_setting(v)}
    assert flagged == {}
    environ = {name: 'x' for name in REALISTIC_ENVIRONMENT}
    assert sweep.check_settings({**environ, 'MODES': 'st'})['MODES'] == 'st'


def test_every_setting_and_alias_is_known():
    for name in ('TABLE', 'DATA_ROOT', 'RESULTS', 'GPUS', 'GPU', 'JOBS_PER_GPU', 'DATASETS', 'MODES', 'PAIRS',
                 'DML_PAIRS', 'SEEDS', 'EPOCHS', 'EXTRA_ARGS', 'KD_ARGS', 'DRY_RUN', 'PYTHON', 'TEACHERS', 'EXECUTOR',
                 'PARTITION', 'TIME_LIMIT', 'GPUS_PER_JOB', 'MAX_JOBS', 'SBATCH_OPTIONS'):
        assert sweep.misspelt_setting(name) is None, name


# ----------------------------------------------------------------------------- the command and the script

def test_check_settings_prints_what_bash_evals_back_unchanged():
    extra = "--note 'a b' --device cpu"
    script = 'eval "$("$PYTHON" sweep.py check-settings)" && printf "%s|" "$EXTRA_ARGS" "$MODES" "$DRY_RUN" ' \
             '"$TAG" "$DEFAULT_EPOCHS" "$ALL_NETWORKS"'
    p = subprocess.run(['bash', '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHON': sys.executable, 'EXTRA_ARGS': extra, 'MODES': 'st at',
                            'DRY_RUN': 'yes', 'TABLE': 'crd', 'EPOCHS': '30'})
    assert p.returncode == 0, p.stderr
    values = p.stdout.split('|')
    assert values[:6] == [extra, 'st at', '1', '-crd', '240', ' '.join(NETWORKS)]


def test_check_settings_refuses_in_one_line_with_exit_2():
    p = subprocess.run([sys.executable, 'sweep.py', 'check-settings'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, 'EPOCH': '2'})
    assert p.returncode == 2 and p.stdout == '', p.stdout + p.stderr
    assert p.stderr.startswith('error: EPOCH is not a setting of the sweep: did you mean EPOCHS?')
    assert len(p.stderr.splitlines()) == 1


def test_the_scripts_list_of_settings_is_the_table():
    header = open(SCRIPT).read().split('\nset -euo pipefail')[0]
    listed = re.findall(r'^#   ([A-Z_]+)=', header, re.M)
    assert listed == [s.name for s in sweep.SETTINGS]
    help_text = subprocess.run([sys.executable, 'sweep.py', '--help'], cwd=ROOT, capture_output=True, text=True,
                               timeout=300).stdout
    for s in sweep.SETTINGS:
        assert f'\n  {s.name}' in help_text and s.help in help_text, s.name


def test_the_slurm_executor_without_submitit_is_one_line(monkeypatch):
    """submitit is optional (requirements-cluster.txt): without it, EXECUTOR=slurm
    and `sweep.py status` say what to install instead of a traceback."""
    import builtins
    real_import = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == 'submitit':
            raise ImportError('No module named submitit')
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_submitit)
    with pytest.raises(UserError, match='pip install -r requirements-cluster.txt'):
        sweep.slurm_executor()
