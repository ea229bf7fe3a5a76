"""The GPU check of the captured training step: is it right, and how fast is it?

    python tools/gpu_check.py --img_root DIR --out OUT [--parts right speed accuracy] [--minutes 6]

DIR holds CIFAR-10 in the standard python layout (cifar-10-batches-py/);
OUT receives the results: right.json, speed.json and speed.md,
accuracy.json, and gpu_check.log with everything printed.

right     For every configuration bench.py knows (baselines, every --kd_mode,
          DML): the same start (seed 0, the same batches) trained for
          --steps steps eagerly and with the step replayed as CUDA graphs
          (--compile graphs). Checked: the step is captured (no eager
          fallback), no host sync happens once the graphs replay
          (torch.cuda.set_sync_debug_mode('error')), the two loss curves
          agree within bf16 tolerance (20-step means within 5% relative:
          single steps diverge at random init, whatever the code), and an lr
          written after capture takes effect (lr 0: the weights stay exactly).
speed     bench.py for every configuration with the graphs, eager and fp32
          paths (GPU time per step from CUDA events, wall time, peak memory),
          and the aggregate images/s of 1, 2, 4 and 8 concurrent baselines.
accuracy  resnet20 on CIFAR-10 for --epochs epochs, the fast path with graphs
          against plain fp32 eager: final test top-1 within 0.5 points.

Each part gets a share of --minutes and stops starting new work when its
share is spent: what it did not reach is listed as skipped. --device cpu
runs the same code without a GPU (graphs then run eagerly), to check the
script itself.
"""
import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402  (after the path: this script runs from tools/)
from capture import StepRunner  # noqa: E402
from dataset import DATASETS, DeviceLoader  # noqa: E402

LOG_LINES = []
SLOW = ('kd-bss', 'kd-sobolev', 'kd-lwm')  # input gradients: far more work per step


def say(text):
    print(text, flush=True)
    LOG_LINES.append(text)


@contextmanager
def host_syncs_are_errors(device, on):
    """Within: any host sync on `device` raises (CUDA only)."""
    if not (on and device.type == 'cuda'):
        yield
        return
    torch.cuda.set_sync_debug_mode('error')
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode('default')


def synthetic_loader(device, batch_size, n):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DeviceLoader(images, labels, DATASETS['cifar10'], batch_size, device, train=True,
                        channels_last=device.type == 'cuda')


def loss_curve(name, mode, steps, device, batch_size, n_images):
    """Per-sample loss (the step's first term) of each of `steps` steps of one
    configuration from a fixed start, eager (mode 'off') or replayed ('graphs');
    replays run with host syncs made errors. Returns (curve, runner, step)."""
    args = bench.script_args(name, str(device), 'eager', batch_size)
    loader = synthetic_loader(device, batch_size, n_images)
    torch.manual_seed(0)
    step, stats, model = bench.build(name, args, loader.labels)
    runner = StepRunner(step, mode, device, log=say)
    curve, previous, batches = [], 0.0, iter(loader)
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        with host_syncs_are_errors(device, mode == 'graphs' and runner.graphs):
            runner(batch)
        total = stats.total[0].item()
        curve.append((total - previous) / batch_size)
        previous = total
    return curve, runner, step


def window_means(curve, window=20):
    window = min(window, len(curve))
    return [sum(curve[i:i + window]) / window for i in range(0, len(curve) - window + 1, window)]


def check_right(args, names, minutes, out):
    deadline = time.time() + 60 * minutes
    results = {}
    for name in names:
        if time.time() > deadline:
            results[name] = {'ok': None, 'skipped': 'out of time'}
            continue
        steps = max(args.steps // 3, 2) if name in SLOW else args.steps
        try:
            eager, _, _ = loss_curve(name, 'off', steps, args.device, args.batch_size, args.n_train)
            graphs, runner, step = loss_curve(name, 'graphs', steps, args.device, args.batch_size,
                                              args.n_train)
            worst = max(abs(a - b) / max(abs(a), 1e-6)
                        for a, b in zip(window_means(eager), window_means(graphs)))
            captured = len(runner.graphs) > 0 and not runner.eager_keys
            lr_ok = None
            optimizer = getattr(step, 'optimizer', None)
            if optimizer is not None:  # an lr written after capture takes effect
                optimizer.set_lr(0.0)
                before = [p.detach().clone() for p in optimizer.params]
                runner(next(iter(synthetic_loader(args.device, args.batch_size, args.batch_size))))
                lr_ok = all(torch.equal(a, b) for a, b in zip(before, optimizer.params))
            finite = all(abs(v) < float('inf') for v in graphs)  # NaN fails < as well
            results[name] = {'captured': captured, 'graphs': len(runner.graphs), 'finite': finite,
                             'worst_window_rel_diff': round(worst, 4), 'lr_write_takes_effect': lr_ok,
                             'ok': bool(captured and finite and worst < 0.05 and lr_ok is not False)}
        except Exception as e:  # noqa: BLE001  (one configuration failing must not end the check)
            results[name] = {'ok': False, 'error': f'{type(e).__name__}: {str(e)[:300]}',
                             'trace': traceback.format_exc()[-1500:]}
        say(f"right {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'trace'})}")
    with open(os.path.join(out, 'right.json'), 'w') as f:
        json.dump(results, f, indent=2)
    return results


def check_speed(args, names, minutes, out):
    deadline = time.time() + 60 * minutes
    results, device = [], str(args.device)
    for name in names:
        for path in ('graphs', 'eager', 'fp32'):
            if time.time() > deadline:
                say(f'speed {name} {path}: skipped (out of time)')
                continue
            if path == 'fp32' and name not in ('base-r20', 'base-r110', 'kd-st'):
                continue  # the fp32 baseline of a few configurations is enough
            warmup, steps = (args.steps // 20 + 2, args.steps // 6 + 2) if name in SLOW else \
                (args.steps // 6 + 3, args.steps)
            try:
                r = bench.measure(name, device, path, args.batch_size, warmup, steps,
                                  n_train=args.n_train, n_test=args.n_test)
                results.append(r)
                gpu = f", GPU {r['gpu_ms_per_step']:.2f} ms/step" if r['gpu_ms_per_step'] else ''
                say(f"speed {name} {path}: {r['s_per_epoch']:.2f} s/epoch{gpu}, wall "
                    f"{r['wall_ms_per_step']:.2f} ms/step")
            except Exception as e:  # noqa: BLE001
                say(f'speed {name} {path}: failed: {type(e).__name__}: {str(e)[:300]}')
    concurrent = []
    for copies in args.concurrent:
        if time.time() > deadline:
            say(f'concurrent x{copies}: skipped (out of time)')
            continue
        try:
            concurrent.append(bench.concurrent('base-r20', device, 'graphs', args.batch_size,
                                               args.steps // 6 + 3, args.steps, copies,
                                               (args.n_train, args.n_test), 20 + 5 * copies))
            say(f"concurrent base-r20 graphs x{copies}: {concurrent[-1]['img_per_s']:.0f} img/s in all")
        except Exception as e:  # noqa: BLE001
            say(f'concurrent x{copies}: failed: {type(e).__name__}: {e}')
    with open(os.path.join(out, 'speed.json'), 'w') as f:
        json.dump({'results': results, 'concurrent': concurrent}, f, indent=2)
    with open(os.path.join(out, 'speed.md'), 'w') as f:
        f.write(bench.markdown(results, ['graphs', 'eager', 'fp32']) + '\n')
        if concurrent:
            f.write('\n' + bench.markdown(concurrent, ['graphs']) + '\n')
    return results


def check_accuracy(args, out):
    results = {}
    for label, flags in (('fast+graphs', ['--amp', '--channels_last', '--compile', 'graphs']),
                         ('fp32 eager', ['--no-amp', '--no-channels_last', '--compile', 'off'])):
        note = label.replace(' ', '-').replace('+', '-')
        start = time.time()
        cmd = [sys.executable, os.path.join(ROOT, 'train_base.py'), '--data_name', 'cifar10',
               '--net_name', 'resnet20', '--img_root', args.img_root, '--save_root',
               os.path.join(out, 'runs'), '--note', note, '--epochs', str(args.epochs),
               '--batch_size', str(args.batch_size), '--device', str(args.device), '--no_download',
               '--no_progress', '--overwrite', *flags]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        results[label] = {'exit': p.returncode, 'seconds': round(time.time() - start, 1),
                          'stderr': p.stderr[-500:]}
        try:
            with open(os.path.join(out, 'runs', note, 'metrics.csv')) as f:
                header, *rows = f.read().splitlines()
            results[label]['final_top1'] = float(rows[-1].split(',')[header.split(',').index('test_top1')])
        except (OSError, ValueError, IndexError):
            results[label]['final_top1'] = None
        say(f'accuracy {label}: {json.dumps(results[label])[:400]}')
    tops = [r['final_top1'] for r in results.values()]
    results['within_0.5'] = None if None in tops else abs(tops[0] - tops[1]) <= 0.5
    say(f"accuracy: final top-1 within 0.5 points: {results['within_0.5']}")
    with open(os.path.join(out, 'accuracy.json'), 'w') as f:
        json.dump(results, f, indent=2)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img_root', default='./datasets')
    parser.add_argument('--out', default=os.environ.get('OUT', './gpu_check'))
    parser.add_argument('--parts', nargs='+', choices=('right', 'speed', 'accuracy'),
                        default=['right', 'speed', 'accuracy'])
    parser.add_argument('--configs', nargs='+', default=['*'], metavar='PATTERN',
                        help='bench.py configurations (shell patterns); default: all')
    parser.add_argument('--minutes', type=float, default=6.0, help="the whole check's budget")
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--steps', type=int, default=200, help='right: steps of each curve; speed: timed steps')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--n_train', type=int, default=12800, help='synthetic training images')
    parser.add_argument('--n_test', type=int, default=10000, help='speed: synthetic test images')
    parser.add_argument('--concurrent', type=int, nargs='*', default=[1, 2, 4, 8],
                        help='speed: concurrent baselines (none: skip)')
    parser.add_argument('--epochs', type=int, default=15, help='accuracy: epochs of each run')
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('error: this check needs a CUDA GPU (or --device cpu to check the script)')
    names = [n for n in bench.config_names() if any(fnmatch.fnmatch(n, p) for p in args.configs)]
    os.makedirs(args.out, exist_ok=True)
    where = torch.cuda.get_device_name() if args.device.type == 'cuda' else 'cpu'
    say(f'{where} | torch {torch.__version__} | {time.strftime("%Y-%m-%d %H:%M")} | '
        f'{" ".join(sys.argv[1:] if argv is None else argv)}')
    share = {'right': 0.35, 'speed': 0.4, 'accuracy': 0.25}
    total = sum(share[p] for p in args.parts)
    try:
        for part in args.parts:
            minutes = args.minutes * share[part] / total
            say(f'--- {part} ({minutes:.1f} min)')
            if part == 'right':
                check_right(args, names, minutes, args.out)
            elif part == 'speed':
                check_speed(args, names, minutes, args.out)
            else:
                check_accuracy(args, args.out)
    finally:
        with open(os.path.join(args.out, 'gpu_check.log'), 'w') as f:
            f.write('\n'.join(LOG_LINES) + '\n')


if __name__ == '__main__':
    main()
