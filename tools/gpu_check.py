"""The GPU check of the captured training step: is it right, and how fast is it?

    python tools/gpu_check.py --img_root DIR --out OUT [--parts right speed accuracy] [--minutes 6]

DIR holds CIFAR-10 in the standard python layout (cifar-10-batches-py/);
OUT receives the results (at most a few files): right.json, speed.json and
speed.md, accuracy.json, and gpu_check.log with everything printed.

right     For every configuration bench.py knows (baselines, every --kd_mode,
          DML): the same starting state trained for STEPS steps eagerly and
          with the step replayed as CUDA graphs (--compile graphs). Checked:
          the capture happens (no eager fallback), no host sync once the
          graphs replay (torch.cuda.set_sync_debug_mode('error')), the two
          loss curves agree within bf16 tolerance (20-step means within 5%
          relative; single steps diverge at random init, whatever the code),
          and an lr written after capture takes effect (lr 0: the weights
          stay exactly as they are).
speed     bench.py for every configuration with the graphs, eager and fp32
          paths (GPU time per step from CUDA events, wall time, peak memory),
          and aggregate images/s of 1, 2, 4 and 8 concurrent baselines.
accuracy  resnet20 on CIFAR-10 for 15 epochs, fast path with graphs against
          plain fp32 eager: final test top-1 within 0.5 points.

Each part is sized to the minute budget it is given and stops early rather
than overrun: what was not reached is listed as skipped.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402  (after the path: this script runs from tools/)
from capture import StepRunner  # noqa: E402
from dataset import DATASETS, DeviceLoader  # noqa: E402

LOG_LINES = []


def say(text):
    print(text, flush=True)
    LOG_LINES.append(text)


def loss_curve(name, mode, steps):
    """Per-step loss (the step's first loss term) of `steps` steps of one
    configuration from a fixed start (seed 0, the same batches), eager
    (mode 'off') or replayed (mode 'graphs'); replays run with host syncs
    made errors. Returns (curve, runner, step)."""
    args = bench.script_args(name, 'cuda', 'eager', 128)
    loader = synthetic_loader(128, 12800)
    torch.manual_seed(0)
    step, stats, model = bench.build(name, args, loader.labels)
    runner = StepRunner(step, mode, 'cuda', log=say)
    curve, previous, batches = [], 0.0, iter(loader)
    for _ in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        replaying = mode == 'graphs' and len(runner.graphs) > 0
        if replaying:
            torch.cuda.set_sync_debug_mode('error')
        try:
            runner(batch)
        finally:
            torch.cuda.set_sync_debug_mode('default')
        total = stats.total[0].item()
        curve.append((total - previous) / 128)
        previous = total
    return curve, runner, step


def window_means(curve, window=20):
    return [sum(curve[i:i + window]) / window for i in range(0, len(curve) - window + 1, window)]


def check_right(minutes, out):
    deadline = time.time() + 60 * minutes
    results = {}
    for name in bench.config_names():
        if time.time() > deadline:
            results[name] = {'ok': None, 'skipped': 'out of time'}
            continue
        steps = 60 if name in ('kd-bss', 'kd-sobolev', 'kd-lwm') else 200
        try:
            eager, _, _ = loss_curve(name, 'off', steps)
            graphs, runner, step = loss_curve(name, 'graphs', steps)
            worst = max(abs(a - b) / max(abs(a), 1e-6)
                        for a, b in zip(window_means(eager), window_means(graphs)))
            captured = len(runner.graphs) > 0 and not runner.eager_keys
            lr_ok = None
            optimizer = getattr(step, 'optimizer', None)
            if captured and optimizer is not None:  # an lr written after capture takes effect
                optimizer.set_lr(0.0)
                before = [p.detach().clone() for p in optimizer.params]
                runner(next(iter(synthetic_loader(128, 1280))))
                lr_ok = all(torch.equal(a, b) for a, b in zip(before, optimizer.params))
            finite = all(abs(v) < float('inf') for v in graphs)  # NaN fails < as well
            results[name] = {'captured': captured, 'graphs': len(runner.graphs), 'finite': finite,
                             'worst_window_rel_diff': round(worst, 4), 'lr_write_takes_effect': lr_ok,
                             'ok': bool(captured and finite and worst < 0.05 and lr_ok is not False)}
        except Exception as e:  # noqa: BLE001  (one configuration failing must not end the check)
            torch.cuda.set_sync_debug_mode('default')
            results[name] = {'ok': False, 'error': f'{type(e).__name__}: {str(e)[:300]}',
                             'trace': traceback.format_exc()[-1500:]}
        say(f"right {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'trace'})}")
    with open(os.path.join(out, 'right.json'), 'w') as f:
        json.dump(results, f, indent=2)
    return results


def synthetic_loader(batch_size, n):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DeviceLoader(images, labels, DATASETS['cifar10'], batch_size, 'cuda', train=True,
                        channels_last=True)


def check_speed(minutes, out):
    deadline = time.time() + 60 * minutes
    results = []
    for name in bench.config_names():
        for path in ('graphs', 'eager', 'fp32'):
            if time.time() > deadline or (path == 'fp32' and name not in ('base-r20', 'base-r110', 'kd-st')):
                continue
            slow = name in ('kd-bss',)
            try:
                r = bench.measure(name, 'cuda', path, 128, 10 if slow else 30, 30 if slow else 150)
                results.append(r)
                say(f"speed {name} {path}: {r['s_per_epoch']:.2f} s/epoch, GPU {r['gpu_ms_per_step']:.2f} "
                    f"ms/step, wall {r['wall_ms_per_step']:.2f} ms/step, {r['peak_mem_mb']:.0f} MiB")
            except Exception as e:  # noqa: BLE001
                say(f'speed {name} {path}: failed: {type(e).__name__}: {str(e)[:300]}')
    concurrent = []
    for copies in (1, 2, 4, 8):
        if time.time() > deadline:
            break
        try:
            concurrent.append(bench.concurrent('base-r20', 'cuda', 'graphs', 128, 30, 150, copies,
                                               (12800, 2000), 20 + 5 * copies))
            say(f"concurrent base-r20 graphs x{copies}: {concurrent[-1]['img_per_s']:.0f} img/s in all")
        except Exception as e:  # noqa: BLE001
            say(f'concurrent x{copies}: failed: {type(e).__name__}: {e}')
    with open(os.path.join(out, 'speed.json'), 'w') as f:
        json.dump({'results': results, 'concurrent': concurrent}, f, indent=2)
    with open(os.path.join(out, 'speed.md'), 'w') as f:
        f.write(bench.markdown(results, ['graphs', 'eager', 'fp32']) + '\n\n')
        if concurrent:
            f.write(bench.markdown(concurrent, ['graphs']) + '\n')
    return results


def check_accuracy(img_root, epochs, out):
    results = {}
    for label, flags in (('fast+graphs', ['--amp', '--channels_last', '--compile', 'graphs']),
                         ('fp32 eager', ['--no-amp', '--no-channels_last', '--compile', 'off'])):
        note = label.replace(' ', '-').replace('+', '-')
        start = time.time()
        cmd = [sys.executable, os.path.join(ROOT, 'train_base.py'), '--data_name', 'cifar10',
               '--net_name', 'resnet20', '--img_root', img_root, '--save_root', os.path.join(out, 'runs'),
               '--note', note, '--epochs', str(epochs), '--no_download', '--no_progress', *flags]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        last = [line for line in p.stdout.splitlines() if line.startswith('[main]')]
        results[label] = {'exit': p.returncode, 'seconds': time.time() - start,
                          'last_epoch': last[-1] if last else None, 'stderr': p.stderr[-500:]}
        try:
            rows = open(os.path.join(out, 'runs', note, 'metrics.csv')).read().splitlines()
            results[label]['final_top1'] = float(rows[-1].split(',')[rows[0].split(',').index('test_top1')])
        except (OSError, ValueError, IndexError):
            results[label]['final_top1'] = None
        say(f'accuracy {label}: {json.dumps(results[label])[:400]}')
    tops = [r['final_top1'] for r in results.values()]
    results['within_0.5'] = None if None in tops else abs(tops[0] - tops[1]) <= 0.5
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
    parser.add_argument('--minutes', type=float, default=6.0, help='the whole check\'s budget')
    parser.add_argument('--epochs', type=int, default=15, help='accuracy: epochs of each run')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('error: this check needs a CUDA GPU')
    os.makedirs(args.out, exist_ok=True)
    say(f'{torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime("%Y-%m-%d %H:%M")}')
    share = {'right': 0.35, 'speed': 0.4, 'accuracy': 0.25}
    total = sum(share[p] for p in args.parts)
    try:
        for part in args.parts:
            minutes = args.minutes * share[part] / total
            say(f'--- {part} ({minutes:.1f} min)')
            if part == 'right':
                check_right(minutes, args.out)
            elif part == 'speed':
                check_speed(minutes, args.out)
            else:
                check_accuracy(args.img_root, args.epochs, args.out)
    finally:
        with open(os.path.join(args.out, 'gpu_check.log'), 'w') as f:
            f.write('\n'.join(LOG_LINES) + '\n')


if __name__ == '__main__':
    main()
