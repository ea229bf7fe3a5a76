"""Released teachers from the user's side: a folder in RepDistiller's or
mdistiller's layout, its files written here as train_teacher.py saves them
({'epoch', 'model', 'accuracy', 'optimizer'}, the benchmark's parameter
names); each is found, identified (network, classes) and hashed, used by
train_kd.py (args.json names it by sha256), refused when it holds another
network or class count or lies too far below its published accuracy; the
accuracy is measured once, then read from the cache. A student without
--s_init starts from a fresh initialisation of its seed, saved in its run
directory and kept by --resume."""
import hashlib
import json
import os

import pytest
import torch

import teachers
import train_kd
from conftest import assert_same_run, stop_after_first_epoch_then_resume, write_cifar
from errors import UserError
from network import build_network


def benchmark_state(net, prefix=''):
    """`net`'s state dict under the benchmark's names (RepDistiller's CIFAR
    ResNets call our resK / ds layerK / downsample), renamed here
    independently of the project's code."""
    out = {}
    for key, value in net.state_dict().items():
        for ours, theirs in (('res1.', 'layer1.'), ('res2.', 'layer2.'), ('res3.', 'layer3.'),
                             ('.ds.', '.downsample.')):
            key = key.replace(ours, theirs)
        out[prefix + key] = value.clone()
    return out


def release(folder, layout, net_name, num_class=100, seed=0, prefix=''):
    """Write `net_name` as the benchmark releases it, in `layout`; returns the file."""
    torch.manual_seed(seed)
    net = build_network(net_name, num_class)
    sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).out.sum().backward()
    sgd.step()  # an optimiser state with momentum buffers, as a trained teacher's has
    sub = os.path.join(folder, 'cifar_teachers' if layout == 'mdistiller' else '', f'{net_name}_vanilla')
    os.makedirs(sub, exist_ok=True)
    path = os.path.join(sub, 'ckpt_epoch_240.pth')
    torch.save({'epoch': 240, 'model': benchmark_state(net, prefix), 'accuracy': torch.tensor(1.25),
                'optimizer': sgd.state_dict()}, path)
    return path


def sha256_of(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope='module')
def cifar100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar100')
    write_cifar(str(root), 'cifar100', n_train=40, n_test=20, learnable=True)
    return str(root)


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """Two teacher folders: resnet8 (100 classes) in RepDistiller's layout,
    and the same network, DataParallel-prefixed, in mdistiller's."""
    root = tmp_path_factory.mktemp('released')
    rep, md = str(root / 'repdistiller'), str(root / 'mdistiller')
    return {'RepDistiller': (rep, release(rep, 'RepDistiller', 'resnet8')),
            'mdistiller': (md, release(md, 'mdistiller', 'resnet8', seed=1, prefix='module.'))}


def kd_argv(root, save_root, note, t_model, *extra, epochs=1):
    return ['--data_name', 'cifar100', '--img_root', root, '--save_root', str(save_root), '--note', note,
            '--t_name', 'resnet8', '--s_name', 'resnet8', '--t_model', t_model, '--kd_mode', 'st',
            '--epochs', str(epochs), '--batch_size', '20', '--device', 'cpu', '--no_download', *extra]


@pytest.mark.parametrize('layout', ['RepDistiller', 'mdistiller'])
def test_each_layout_is_found_identified_and_hashed(released, layout, capsys):
    folder, path = released[layout]
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {'epoch', 'model', 'accuracy', 'optimizer'}
    assert any(k.endswith('layer1.0.conv1.weight') for k in ckpt['model'])  # the benchmark's names
    assert teachers.find_teacher(folder, 'resnet8') == path
    teacher = teachers.identify(path)
    assert (teacher.network, teacher.num_class, teacher.layout) == ('resnet8', 100, layout)
    assert teacher.sha256 == sha256_of(path)
    teachers.main(['find', folder, 'resnet8'])
    assert capsys.readouterr().out.strip() == path


def test_a_missing_or_mismatched_teacher_is_refused_in_one_line(released, cifar100_root, tmp_path,
                                                                capsys):
    folder, _ = released['RepDistiller']
    with pytest.raises(SystemExit) as stop:
        teachers.main(['find', folder, 'resnet32x4'])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count('\n') == 1
    assert 'no released teacher for resnet32x4' in err and 'holds resnet8' in err
    # another network in the folder named for resnet8
    wrong = str(tmp_path / 'wrong')
    os.makedirs(os.path.join(wrong, 'resnet8_vanilla'))
    os.replace(release(str(tmp_path / 'tmp'), 'RepDistiller', 'resnet20'),
               os.path.join(wrong, 'resnet8_vanilla', 'ckpt_epoch_240.pth'))
    with pytest.raises(UserError, match=r'holds resnet20 with 100 classes, not resnet8$'):
        teachers.verify(wrong, 'resnet8', 'unused', str(tmp_path / 'cache.json'))
    # the right network for another number of classes: train_kd.py names what it holds
    ten = str(tmp_path / 'ten')
    release(ten, 'mdistiller', 'resnet8', num_class=10)
    with pytest.raises(SystemExit):
        train_kd.main(kd_argv(cifar100_root, tmp_path / 'runs', 'ten', ten))
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'the file holds resnet8 with 10 classes' in err
    assert not os.path.exists(tmp_path / 'runs' / 'ten')  # refused before anything is written


def test_a_student_learns_from_a_released_folder_and_records_the_teacher(released, cifar100_root,
                                                                          tmp_path, monkeypatch):
    folder, path = released['mdistiller']
    train_kd.main(kd_argv(cifar100_root, tmp_path, 'a', folder, epochs=2))
    run = tmp_path / 'a'
    with open(run / 'args.json') as f:
        record = json.load(f)
    assert record['teacher'] == {'path': path, 'network': 'resnet8', 'num_class': 100,
                                 'sha256': sha256_of(path), 'layout': 'mdistiller'}
    assert record['args']['t_model'] == path and record['args']['s_init'] is None
    initial = run / 'initial.pth.tar'
    assert record['student_init'] == {'path': str(initial), 'sha256': sha256_of(initial), 'seed': 2}
    saved = torch.load(initial, weights_only=True)['net']
    fresh = train_kd.fresh_initialisation('resnet8', 100, 2).state_dict()
    assert all(torch.equal(saved['module.' + k], v) for k, v in fresh.items())

    # the same seed, stopped after its first epoch and resumed: the same start,
    # the saved initial weights untouched, the same run as the uninterrupted one
    resumed = tmp_path / 'b'
    argv = kd_argv(cifar100_root, tmp_path, 'b', path, epochs=2)
    import records
    save = records.Checkpointer.__call__
    seen = {}

    def save_then_note(self, *a, **k):
        seen.setdefault('initial', (sha256_of(resumed / 'initial.pth.tar'),
                                    os.stat(resumed / 'initial.pth.tar').st_mtime_ns))
        save(self, *a, **k)
    monkeypatch.setattr(records.Checkpointer, '__call__', save_then_note)
    stop_after_first_epoch_then_resume(monkeypatch, argv)
    assert seen['initial'] == (sha256_of(initial), os.stat(resumed / 'initial.pth.tar').st_mtime_ns)
    with open(resumed / 'args.json') as f:
        assert json.load(f)['student_init']['sha256'] == sha256_of(initial)
    assert_same_run(run, resumed)

    # the saved file is what the student started from: given as --s_init, the same run
    train_kd.main(kd_argv(cifar100_root, tmp_path, 'c', path, '--s_init', str(initial), epochs=2))
    assert_same_run(run, tmp_path / 'c')
    other = train_kd.fresh_initialisation('resnet8', 100, 3).state_dict()
    assert not torch.equal(other['conv1.weight'], fresh['conv1.weight'])  # another seed, another start


def test_verify_measures_once_then_reads_the_cache(released, cifar100_root, tmp_path, monkeypatch,
                                                   capsys):
    folder, path = released['RepDistiller']
    cache = tmp_path / 'acc.json'
    measured = []
    measure = teachers.measure_top1
    monkeypatch.setattr(teachers, 'measure_top1', lambda *a, **k: measured.append(1) or measure(*a, **k))
    argv = ['verify', folder, 'resnet8', '--img_root', cifar100_root, '--cache', str(cache),
            '--device', 'cpu']
    teachers.main(argv)
    first = capsys.readouterr().out
    entry = json.loads(cache.read_text())[sha256_of(path)]
    assert (entry['network'], entry['num_class'], entry['test_images']) == ('resnet8', 100, 20)
    # the same number as evaluating the file with train_base.py
    import train_base
    base = train_base.evaluate_checkpoint(train_base.parse_args(
        ['--data_name', 'cifar100', '--net_name', 'resnet8', '--img_root', cifar100_root,
         '--evaluate', path, '--device', 'cpu', '--no_download']))
    assert entry['top1'] == pytest.approx(base['top1'])
    assert 'measured' in first and f"{entry['top1']:.2f}" in first and 'no published value' in first
    teachers.main(argv)
    assert 'cached' in capsys.readouterr().out and len(measured) == 1


def test_a_teacher_below_its_published_accuracy_is_refused(cifar100_root, tmp_path, capsys):
    assert teachers.published_teacher_top1('resnet56') == 72.34  # RepDistiller's README
    assert teachers.published_teacher_top1('resnet8') is None  # a student only
    folder = str(tmp_path / 'teachers')
    release(folder, 'RepDistiller', 'resnet56')  # untrained: near chance on the test split
    with pytest.raises(SystemExit) as stop:
        teachers.main(['verify', folder, 'resnet56', '--img_root', cifar100_root, '--device', 'cpu'])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count('\n') == 1
    assert 'more than 1 point below its published 72.34' in err
    cache = json.loads((tmp_path / 'released_teachers.json').read_text())  # default: beside DIR
    assert list(cache) == [sha256_of(os.path.join(folder, 'resnet56_vanilla', 'ckpt_epoch_240.pth'))]


def test_a_fresh_student_starts_where_the_baseline_of_its_seed_starts(base_run):
    """train_base.py seeds torch with --seed before building its network: the
    initial weights it saves are the fresh initialisation of that seed."""
    saved = torch.load(base_run['initial'], weights_only=True)['net']
    fresh = train_kd.fresh_initialisation('resnet20', 10, 2).state_dict()  # base_run: seed 2
    assert saved.keys() == {'module.' + k for k in fresh}
    assert all(torch.equal(saved['module.' + k], v) for k, v in fresh.items())
