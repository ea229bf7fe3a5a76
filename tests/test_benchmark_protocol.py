"""The CIFAR-100 benchmark from the user's side: its released teacher files
load with --t_model, a file for another network says which network it holds,
--protocol crd gives the benchmark's schedule (explicit flags win), and the
loss weights it sets act as written."""
import pytest
import torch

import train_kd
from checkpoints import load_network_weights
from errors import UserError
from network import build_network


def benchmark_layout(net):
    """A state dict as RepDistiller saves its teachers: {'model': ...} with its
    own names (`layerK`, `downsample`) and DataParallel's 'module.' prefix,
    renamed here independently of the project's code."""
    renamed = {}
    for key, value in net.state_dict().items():
        for ours, theirs in (('res1.', 'layer1.'), ('res2.', 'layer2.'), ('res3.', 'layer3.'),
                             ('.ds.', '.downsample.')):
            key = key.replace(ours, theirs)
        renamed['module.' + key] = value.clone()
    return {'model': renamed, 'epoch': 240}


def test_a_released_teacher_loads_as_the_benchmark_saved_it(tmp_path):
    torch.manual_seed(0)
    released = build_network('resnet32x4', 100).eval()
    path = tmp_path / 'ckpt_epoch_240.pth'
    torch.save(benchmark_layout(released), path)
    assert 'module.layer1.0.downsample.0.weight' in torch.load(path)['model']
    loaded = load_network_weights(build_network('resnet32x4', 100), str(path), 'teacher (--t_model)').eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x).out, released(x).out)


def test_a_file_for_another_network_says_which_it_holds(tmp_path):
    path = tmp_path / 'wrn.pth'
    torch.save({'model': build_network('wrn_40_2', 100).state_dict()}, path)
    with pytest.raises(UserError, match=r'expected resnet32x4 with 100 classes, the file holds wrn_40_2 '
                                        r'with 100 classes'):
        load_network_weights(build_network('resnet32x4', 100), str(path), 'teacher (--t_model)')


def crd(*flags, student='resnet8x4', mode='st'):
    args, sources, _ = train_kd.parse_args([
        '--data_name', 'cifar100', '--protocol', 'crd', '--t_name', 'resnet32x4', '--s_name', student,
        '--kd_mode', mode, '--t_model', 'x', '--s_init', 'y', '--device', 'cpu', *flags])
    return args, sources


def test_the_protocol_gives_the_benchmarks_schedule_and_explicit_flags_win():
    args, sources = crd()
    assert (args.epochs, args.batch_size, args.lr, args.weight_decay, args.momentum, args.nesterov,
            args.lr_decay_epochs, args.lr_decay_rate) == (240, 64, 0.05, 5e-4, 0.9, False,
                                                          [150, 180, 210], 0.1)
    # Hinton's KD in the benchmark: 0.1 CE + 0.9 KD at T 4
    assert (args.ce_weight, args.lambda_kd, args.T) == (0.1, 0.9, 4.0)
    assert 'under --protocol crd' in sources['lambda_kd']
    for student in ('MobileNetV2', 'ShuffleV1', 'ShuffleV2'):
        assert crd(student=student)[0].lr == 0.01
    args, sources = crd('--lr', '0.02', '--lambda_kd', '2', '--epochs', '120')
    assert args.lr == 0.02 and args.lambda_kd == 2.0 and sources['lambda_kd'] == 'command line'
    assert args.lr_decay_epochs == [75, 90, 105]  # the same fractions of a shorter run
    args, _ = crd('--lr_decay_epochs', '10,20', '--nesterov')
    assert args.lr_decay_epochs == [10, 20] and args.nesterov is True


def test_the_ce_weight_scales_cross_entropy():
    """With --ce_weight 0 and --lambda_kd 0 nothing but weight decay moves the
    student: one Nesterov step from a zero momentum buffer is
    p - lr * (1 + momentum) * wd * p."""
    args, _ = crd('--ce_weight', '0', '--lambda_kd', '0', '--batch_size', '4')
    args.amp = False
    torch.manual_seed(0)
    model, teacher, distiller, _, main, step = train_kd.build_distillation(
        args, torch.device('cpu'), 8, torch.arange(8) % 100, load_weights=False)
    model.train()
    step.optimizer.set_lr(0.1)
    step.set_kd_scale(0.0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    from dataset import Batch
    step(Batch(torch.randn(4, 3, 32, 32), torch.arange(4), torch.arange(4)))
    shrink = 1 - 0.1 * (1 + args.momentum) * args.weight_decay  # nesterov off: 1 - lr * wd
    shrink = 1 - 0.1 * args.weight_decay if not args.nesterov else shrink
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * shrink, rtol=1e-6, atol=1e-8)
