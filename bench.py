"""Time the training step of named configurations on whatever device is here.

Each configuration builds the networks (random weights), its method and the
very step function the training scripts run, feeds it CIFAR-sized synthetic
batches from the on-device loader, and reports images/s and seconds per epoch
(50,000 training images plus one pass over 10,000 test images; both sizes are
flags). With
--compare each configuration runs twice in the same process: the fast path
(bf16 autocast, channels-last; the CUDA default) and plain fp32 (--no-amp
--no-channels_last), and the speed-up is their ratio. --concurrent N runs N
copies of a configuration at once (separate processes, one device) and sums
their throughput. Results print as a Markdown table and go to --json.

    python bench.py --configs base-r20 kd-st kd-at --compare --json bench.json
    python bench.py --configs base-r20 --concurrent 1 2 4 8
"""
import argparse
import fnmatch
import json
import os
import platform
import subprocess
import sys
import time

import torch

import train_base
import train_dml
import train_kd
from dataset import DATASETS, DeviceLoader
from kd_losses import METHODS
from records import describe_device
from utils import EpochStats, evaluate

TEACHER, STUDENT = 'resnet110', 'resnet20'


def config_names():
    return (['base-r20', 'base-r110'] + [f'kd-{m}' for m in sorted(METHODS)] + ['dml'])


def script_args(name, device, fast, batch_size):
    """The resolved flags the training script would have for this configuration."""
    common = ['--data_name', 'cifar10', '--device', device, '--batch_size', str(batch_size),
              '--amp' if fast else '--no-amp',
              '--channels_last' if fast else '--no-channels_last']
    if name.startswith('base-'):
        return train_base.parse_args(common + ['--net_name', 'resnet' + name[len('base-r'):]])
    if name == 'dml':
        return train_dml.parse_args(common + ['--net1_name', TEACHER, '--net2_name', STUDENT,
                                              '--net1_init', 'random', '--net2_init', 'random'])
    args, _, _ = train_kd.parse_args(common + ['--kd_mode', name[len('kd-'):], '--t_name', TEACHER,
                                               '--s_name', STUDENT, '--t_model', 'random',
                                               '--s_init', 'random'])
    return args


def build(name, args, labels):
    """(step, network to evaluate, stat names) for a configuration, from the
    training scripts' own builders, with random weights."""
    device = torch.device(args.device)
    if name.startswith('base-'):
        model, phase = train_base.build_baseline(args, device)
        return phase.step, model, phase.stat_names
    if name == 'dml':
        nets, phase = train_dml.build_mutual(args, device)
        return phase.step, nets['net2'], phase.stat_names
    model, _, distiller, _, _, step = train_kd.build_distillation(args, device, len(labels), labels,
                                                                  load_weights=False)
    distiller.train()
    step.set_kd_scale(args.lambda_kd)  # time the distillation step (also for AB/FSP, BSS warm-up)
    return step, model, step.stat_names


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(name, device, fast, batch_size, warmup, steps, start_at=None, n_train=50000,
            n_test=10000):
    torch.manual_seed(0)
    args = script_args(name, device, fast, batch_size)
    device = torch.device(args.device)
    info = DATASETS['cifar10']
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_train,), generator=g)
    loader = DeviceLoader(images, labels, info, batch_size, device, train=True,
                          channels_last=args.channels_last)
    test = DeviceLoader(images[:n_test], labels[:n_test], info, args.eval_batch_size, device,
                        train=False, channels_last=args.channels_last)
    step, model, names = build(name, args, loader.labels)
    stats = EpochStats(names, [], device)

    def batches():
        while True:
            yield from loader
    stream = batches()
    for _ in range(warmup):
        stats.add(step(next(stream)))
    synchronize(device)
    if start_at is not None:  # concurrent runs: time the same window
        time.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    for _ in range(steps):
        stats.add(step(next(stream)))
    synchronize(device)
    train_seconds = time.perf_counter() - start
    evaluate(model, test, amp=args.amp)  # warm-up pass
    synchronize(device)
    start = time.perf_counter()
    evaluate(model, test, amp=args.amp)
    synchronize(device)
    eval_seconds = time.perf_counter() - start
    ips = steps * batch_size / train_seconds
    return {'config': name, 'fast': fast, 'device': describe_device(device), 'batch_size': batch_size,
            'warmup_steps': warmup, 'timed_steps': steps, 'img_per_s': ips,
            'train_s_per_epoch': n_train / ips, 'eval_s': eval_seconds,
            's_per_epoch': n_train / ips + eval_seconds, 'n_train': n_train, 'n_test': n_test}


def concurrent(name, device, fast, batch_size, warmup, steps, copies, sizes, start_delay):
    """`copies` processes of one configuration timed over the same window."""
    start_at = time.time() + start_delay  # after every copy's start-up and warm-up
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', name, '--device', device,
           '--batch_size', str(batch_size), '--warmup', str(warmup), '--steps', str(steps),
           '--start_at', str(start_at), '--n_train', str(sizes[0]), '--n_test', str(sizes[1])]
    cmd += [] if fast else ['--slow']
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {'config': name, 'fast': fast, 'concurrent': copies, 'device': results[0]['device'],
            'img_per_s': sum(r['img_per_s'] for r in results),
            'per_run_img_per_s': [r['img_per_s'] for r in results]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--configs', nargs='+', default=['*'], metavar='PATTERN',
                        help=f'configurations (shell patterns) among: {" ".join(config_names())}')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps (default 50 on GPU, 2 on CPU)')
    parser.add_argument('--steps', type=int, default=None, help='timed steps (default 200 on GPU, 5 on CPU)')
    parser.add_argument('--compare', action='store_true', help='also time plain fp32, for the ratio')
    parser.add_argument('--slow', action='store_true', help='time plain fp32 only')
    parser.add_argument('--concurrent', type=int, nargs='+', default=None, metavar='N',
                        help='aggregate throughput of N copies at once, for each N given')
    parser.add_argument('--json', default=None, help='write the results here')
    parser.add_argument('--n_train', type=int, default=50000, help='synthetic training images')
    parser.add_argument('--n_test', type=int, default=10000, help='synthetic test images')
    parser.add_argument('--start_delay', type=float, default=None,
                        help='--concurrent: seconds before the timed window (default 30 + 10 per copy)')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--start_at', type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device.startswith('cuda')
    warmup = args.warmup if args.warmup is not None else (50 if gpu else 2)
    steps = args.steps if args.steps is not None else (200 if gpu else 5)
    if args.worker:
        print(json.dumps(measure(args.worker, args.device, not args.slow, args.batch_size, warmup,
                                 steps, args.start_at, args.n_train, args.n_test)))
        return
    names = [n for n in config_names() if any(fnmatch.fnmatch(n, p) for p in args.configs)]
    if not names:
        parser.error(f'no configuration matches {" ".join(args.configs)}')
    modes = [False] if args.slow else ([True, False] if args.compare else [True])
    results = []
    for name in names:
        for fast in modes:
            if args.concurrent:
                for copies in args.concurrent:
                    delay = args.start_delay if args.start_delay is not None else 30 + 10 * copies
                    results.append(concurrent(name, args.device, fast, args.batch_size, warmup, steps,
                                              copies, (args.n_train, args.n_test), delay))
                    r = results[-1]
                    print(f"{name} fast={fast} x{copies}: {r['img_per_s']:.0f} img/s in all", flush=True)
            else:
                results.append(measure(name, args.device, fast, args.batch_size, warmup, steps,
                                       n_train=args.n_train, n_test=args.n_test))
                r = results[-1]
                print(f"{name} fast={fast}: {r['img_per_s']:.0f} img/s, {r['s_per_epoch']:.2f} s/epoch",
                      flush=True)
    print()
    print(markdown(results))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'command': ' '.join(['python', 'bench.py'] + (argv if argv is not None else sys.argv[1:])),
                       'date': time.strftime('%Y-%m-%d'), 'torch': torch.__version__,
                       'python': platform.python_version(), 'results': results}, f, indent=2)


def markdown(results):
    if any('concurrent' in r for r in results):
        rows = ['| config | fast path | runs at once | img/s in all | img/s per run |', '|---|---|---|---|---|']
        rows += [f"| {r['config']} | {'on' if r['fast'] else 'off'} | {r['concurrent']} | "
                 f"{r['img_per_s']:.0f} | {', '.join(f'{x:.0f}' for x in r['per_run_img_per_s'])} |"
                 for r in results]
        return '\n'.join(rows)
    rows = ['| config | img/s | s/epoch (train + test) | plain fp32 img/s | plain fp32 s/epoch | speed-up |',
            '|---|---|---|---|---|---|']
    by_name = {}
    for r in results:
        by_name.setdefault(r['config'], {})[r['fast']] = r
    for name, pair in by_name.items():
        fast, slow = pair.get(True), pair.get(False)
        cells = [f"{fast['img_per_s']:.0f}", f"{fast['s_per_epoch']:.2f}"] if fast else ['', '']
        cells += [f"{slow['img_per_s']:.0f}", f"{slow['s_per_epoch']:.2f}"] if slow else ['', '']
        ratio = f"{slow['s_per_epoch'] / fast['s_per_epoch']:.2f}x" if fast and slow else ''
        rows.append(f'| {name} | ' + ' | '.join(cells + [ratio]) + ' |')
    return '\n'.join(rows)


if __name__ == '__main__':
    main()
