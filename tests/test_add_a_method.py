""""Adding a method is one file", checked end to end: in a copy of the
repository, kd_losses/cos.py is written with the exact code of README.md's
"Adding a method" example (read from the README, so the README stays honest)
and nothing else changes; the method table, the mode names, the sweep's
default modes and a real train_kd.py run then all know `cos`."""
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example():
    """The python block of README.md's "Adding a method" section."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        section = f.read().split('## Adding a method', 1)[1].split('\n## ', 1)[0]
    (code,) = re.findall(r'```python\n(.*?)```', section, re.S)
    assert "name='cos'" in code  # the example this test is about
    return code


def copy_of_the_repository(dest):
    """The repository's files (tracked, and new ones git does not ignore), as they are on disk."""
    names = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split('\0')
    for name in filter(None, names):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):  # a tracked file deleted in the working tree is left out
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))
    return dest


def run(cwd, *argv, env=None):
    p = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_the_readme_example_method_is_one_file(tmp_path, base_run):
    repo = copy_of_the_repository(str(tmp_path / 'repo'))
    assert not os.path.exists(os.path.join(repo, 'kd_losses', 'cos.py'))
    with open(os.path.join(repo, 'kd_losses', 'cos.py'), 'w') as f:
        f.write(readme_example())  # the only file written into the copy

    table = run(repo, sys.executable, '-m', 'kd_losses')
    assert '| `cos` | [cosine feature matching](https://example.org) |' in table
    assert 'cos' in run(repo, sys.executable, '-m', 'kd_losses', '--names').split()

    # the sweep's default MODES (every registered mode) includes it
    out = run(repo, 'bash', 'example_train_script.sh', env={
        'DRY_RUN': '1', 'RESULTS': str(tmp_path / 'res'), 'DATASETS': 'cifar10',
        'PAIRS': 'resnet20:resnet20', 'DML_PAIRS': '', 'PYTHON': sys.executable})
    commands = [shlex.split(line) for line in out.splitlines() if '--kd_mode' in line]
    modes = [mode for c in commands for mode in c[c.index('--kd_mode') + 1].split(',')]
    assert modes.count('cos') == 1  # (it shares the teacher pass of the pair's other students)

    # and train_kd.py trains with it: one epoch on the tiny dataset, from a baseline
    run(repo, sys.executable, 'train_kd.py', '--kd_mode', 'cos', '--data_name', 'cifar10',
        '--t_name', 'resnet20', '--s_name', 'resnet20', '--t_model', base_run['best'],
        '--s_init', base_run['initial'], '--img_root', base_run['img_root'],
        '--save_root', str(tmp_path / 'runs'), '--note', 'cos', '--epochs', '1', '--batch_size', '50',
        '--device', 'cpu', '--no_download')
    run_dir = tmp_path / 'runs' / 'cos'
    assert (run_dir / 'complete.json').is_file()
    log = (run_dir / 'log.txt').read_text()
    assert 'kd_mode cos (cosine feature matching' in log and 'lambda_kd = 1.0' in log
