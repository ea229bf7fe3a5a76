"""Time the training step of named configurations on whatever device is here.

Each configuration builds the networks (random weights), its method and the
very step the training scripts run (their own builders), feeds it CIFAR-sized
synthetic batches from the on-device loader, and reports images/s and
seconds per epoch (50,000 training images plus one pass over 10,000 test
images; both sizes are flags). Each configuration runs in every `--paths`
variant, in the same process, so their ratios compare like with like:

    fp32       plain fp32, eager (--no-amp --no-channels_last --compile off)
    eager      bf16 autocast and channels-last, eager (the CUDA defaults)
    graphs     the same, each step replayed as a CUDA graph (--compile graphs)
    inductor   the same, torch.compile'd, then replayed (--compile inductor)

On CUDA it also reports the GPU time per step (CUDA events around the timed
steps) beside the wall time, and the peak memory. --concurrent N runs N copies
of a configuration at once (separate processes, one device) and sums their
throughput. --processes N trains one configuration with N processes under
torchrun (one GPU each, or CPU processes with gloo) at the same global batch
and reports the step time, collectives included. --shared K trains K
students of the seed pair on one teacher pass (train_kd.py --kd_mode a,b,...:
the teacher forward once per batch, then each student's step) against the
same K students each running its own teacher forward (K separate runs), and
reports images/s per student and in all, and the peak memory; the students
are the KD configurations selected, in turn. Results print as a Markdown
table and go to --json; each result says which step path really ran. On the
CPU the defaults time a baseline and a KD step in about a minute (a first
line says what will be timed, then one line per run as it starts and ends).

    python bench.py --configs base-r20 kd-st kd-at --paths graphs eager fp32 --json bench.json
    python bench.py --configs base-r20 --paths graphs --concurrent 1 2 4 8
    python bench.py --configs base-r20 --paths graphs --processes 1 2
    python bench.py --configs 'kd-*' --paths graphs --shared 1 4 10 20
"""
import argparse
import fnmatch
import json
import os
import platform
import socket
import subprocess
import sys
import textwrap
import time

import torch
import torch.distributed as dist

import train_base
import train_dml
import train_kd
from capture import StepRunner
from dataset import DATASETS, DeviceLoader
from distributed import WORLD, init_distributed, leave_distributed
from errors import ArgumentParser
from flags import HelpFormatter
from kd_losses import METHODS
from records import describe_device
from utils import Evaluator

TEACHER, STUDENT = 'resnet110', 'resnet20'
PATHS = {'fp32': ('--no-amp', '--no-channels_last', '--compile', 'off'),
         'eager': ('--amp', '--channels_last', '--compile', 'off'),
         'graphs': ('--amp', '--channels_last', '--compile', 'graphs'),
         'inductor': ('--amp', '--channels_last', '--compile', 'inductor')}


# What a CPU times by default: about a minute of work (a baseline and a KD
# step), on a share of the test images.
CPU_CONFIGS = ['base-r20', 'kd-st']
CPU_TEST_IMAGES = 1000


def config_names():
    return (['base-r20', 'base-r110'] + [f'kd-{m}' for m in sorted(METHODS)] + ['dml'])


def script_args(name, device, path, batch_size):
    """The resolved flags the training script would have for this configuration
    (off CUDA the graphs path asks for --compile auto, which runs eagerly there
    and says so in the result's step_path, as the scripts refuse graphs)."""
    flags = PATHS[path]
    if torch.device(device).type != 'cuda':
        flags = tuple('auto' if f == 'graphs' else f for f in flags)
    common = ['--data_name', 'cifar10', '--device', device, '--batch_size', str(batch_size), *flags]
    if name.startswith('base-'):
        return train_base.parse_args(common + ['--net_name', 'resnet' + name[len('base-r'):]])
    if name == 'dml':
        return train_dml.parse_args(common + ['--net1_name', TEACHER, '--net2_name', STUDENT,
                                              '--net1_init', 'random', '--net2_init', 'random'])
    args, _, _ = train_kd.parse_args(common + ['--kd_mode', name[len('kd-'):], '--t_name', TEACHER,
                                               '--s_name', STUDENT, '--t_model', 'random',
                                               '--s_init', 'random'])
    return args


def views_of(name):
    """The views of each image a configuration's step reads (kd-mlkd: weak and strong)."""
    return METHODS[name[len('kd-'):]].views if name.startswith('kd-') else ('weak',)


def build(name, args, labels):
    """(step, its EpochStats, network to evaluate) for a configuration, from
    the training scripts' own builders, with random weights."""
    device = torch.device(args.device)
    if name.startswith('base-'):
        model, phase = train_base.build_baseline(args, device)
        return phase.step, phase.stats, model
    if name == 'dml':
        nets, phase = train_dml.build_mutual(args, device)
        return phase.step, phase.stats, nets['net2']
    model, _, distiller, _, _, step = train_kd.build_distillation(args, device, len(labels), labels,
                                                                  load_weights=False)
    distiller.train()
    step.set_kd_scale(args.lambda_kd)  # time the distillation step (also for AB/FSP, BSS warm-up)
    return step, step.stats, model


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(name, device, path, batch_size, warmup, steps, start_at=None, n_train=50000,
            n_test=10000):
    torch.manual_seed(0)
    args = script_args(name, device, path, batch_size)
    device = torch.device(args.device)
    info = DATASETS['cifar10']
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_train,), generator=g)
    # under torchrun (--processes) each process takes its slice of every global batch; a
    # two-view mode's loader also computes the strong view (timed with the step, as in training)
    loader = DeviceLoader(images, labels, info, batch_size, device, train=True, rank=WORLD.rank,
                          world=WORLD.size, channels_last=args.channels_last,
                          strong_view='strong' in views_of(name))
    # the CPU times its test pass over a share of the images, scaled to n_test
    timed_test = n_test if device.type == 'cuda' else min(n_test, CPU_TEST_IMAGES)
    test = DeviceLoader(images[:timed_test], labels[:timed_test], info, args.eval_batch_size, device,
                        train=False, rank=WORLD.rank, world=WORLD.size, channels_last=args.channels_last)
    step, stats, model = build(name, args, loader.labels)
    runner = StepRunner(step, args.compile, device)
    evaluator = Evaluator(model, test, args.amp, args.compile)
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def batches():
        while True:
            yield from loader
    stream = batches()
    compile_start = time.perf_counter()
    for _ in range(warmup):  # includes the capture (and compilation) of the step
        runner(next(stream))
    synchronize(device)
    warmup_seconds = time.perf_counter() - compile_start
    if start_at is not None:  # concurrent runs: time the same window
        time.sleep(max(0.0, start_at - time.time()))
    if dist.is_initialized():  # torchrun: every process starts the timed window together
        dist.barrier()
    runner.begin_epoch()  # step_path: how the timed steps ran
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    start = time.perf_counter()
    for _ in range(steps):
        runner(next(stream))
    if cuda:
        end.record()
    synchronize(device)
    train_seconds = time.perf_counter() - start
    gpu_ms = begin.elapsed_time(end) / steps if cuda else None
    evaluator()  # warm-up pass (and capture)
    synchronize(device)
    start = time.perf_counter()
    evaluator()
    synchronize(device)
    eval_seconds = (time.perf_counter() - start) * n_test / timed_test
    ips = steps * batch_size / train_seconds  # the global batch under torchrun
    step_path, fallback = runner.record()
    return {'config': name, 'path': path, 'device': describe_device(device), 'batch_size': batch_size,
            'processes': WORLD.size, 'step_path': step_path, 'step_fallback': fallback,
            'warmup_steps': warmup, 'timed_steps': steps, 'img_per_s': ips,
            'wall_ms_per_step': 1000 * train_seconds / steps, 'gpu_ms_per_step': gpu_ms,
            'warmup_s': warmup_seconds,
            'peak_mem_mb': torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None,
            'train_s_per_epoch': n_train / ips, 'eval_s': eval_seconds, 'eval_timed_images': timed_test,
            's_per_epoch': n_train / ips + eval_seconds, 'n_train': n_train, 'n_test': n_test,
            'finite': bool(torch.isfinite(stats.total).all())}


def shared_teacher_runs(names, device, path, batch_size, warmup, steps, k, n_train=50000):
    """K students (the KD configurations `names`, in turn) on one teacher
    pass against the same K each with its own teacher forward, over the
    same batches: images/s per student and in all, peak memory. Both
    variants are built at once and their steps alternate, so that a machine
    whose load changes meanwhile slows both alike; each one's peak memory
    leaves out what the other's networks hold."""
    import shared_teacher
    modes = [names[i % len(names)][len('kd-'):] for i in range(k)]
    torch.manual_seed(0)
    args = script_args(names[0], device, path, batch_size)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_train,), generator=g)
    loader = DeviceLoader(images, labels, DATASETS['cifar10'], batch_size, device, train=True,
                          channels_last=args.channels_last)
    cuda = device.type == 'cuda'
    allocated = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    variants = {}
    for how in ('separate', 'shared'):
        before = allocated()
        teacher = teacher_pass = None
        if how == 'shared':
            teacher = train_kd.frozen_teacher(train_kd.build_network(TEACHER, 10), args, device,
                                              load_weights=False)
            teacher_pass = shared_teacher.TeacherPass(teacher, args, device)
        runners, streams = [], []
        for mode in modes:
            student_args = script_args(f'kd-{mode}', str(device), path, batch_size)
            _, _, distiller, _, _, step = train_kd.build_distillation(
                student_args, device, n_train, loader.labels, load_weights=False, teacher=teacher,
                teacher_forward=teacher_pass)
            distiller.train()
            step.set_kd_scale(student_args.lambda_kd)
            runners.append(StepRunner(step, student_args.compile, device))
            streams.append({'torch': torch.get_rng_state()})
        variants[how] = {'teacher_pass': teacher_pass, 'runners': runners, 'streams': streams,
                         'built_bytes': allocated() - before, 'seconds': 0.0, 'peak': 0}

    def train_step(v, batch):
        if v['teacher_pass'] is not None:
            v['teacher_pass'].run(batch)
        for runner, rng in zip(v['runners'], v['streams']):
            shared_teacher.swap_torch_rng(rng)  # as the shared loop does (each student's stream)
            runner(batch)
            shared_teacher.save_torch_rng(rng)

    def batches():
        while True:
            yield from loader
    stream = batches()
    for i in range(warmup + steps):
        batch = next(stream)
        for how, v in variants.items():
            other = variants['shared' if how == 'separate' else 'separate']
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            train_step(v, batch)
            synchronize(device)
            if i >= warmup:
                v['seconds'] += time.perf_counter() - start
                if cuda:
                    v['peak'] = max(v['peak'], torch.cuda.max_memory_allocated(device) - other['built_bytes'])
    result = {'config': f'{k} x ({" ".join(sorted(set(modes)))})', 'path': path, 'students': k,
              'device': describe_device(device), 'batch_size': batch_size, 'timed_steps': steps}
    for how, v in variants.items():
        per_student = steps * batch_size / v['seconds']
        result[how] = {'img_per_s_per_student': per_student, 'img_per_s': per_student * k,
                       'peak_mem_mb': v['peak'] / 2 ** 20 if cuda else None,
                       'step_path': v['runners'][0].record()[0]}
    result['speedup'] = result['shared']['img_per_s'] / result['separate']['img_per_s']
    return result


def concurrent(name, device, path, batch_size, warmup, steps, copies, sizes, start_delay):
    """`copies` processes of one configuration timed over the same window."""
    start_at = time.time() + start_delay  # after every copy's start-up and warm-up
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', name, '--device', device,
           '--batch_size', str(batch_size), '--warmup', str(warmup), '--steps', str(steps),
           '--start_at', str(start_at), '--n_train', str(sizes[0]), '--n_test', str(sizes[1]),
           '--paths', path]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {'config': name, 'path': path, 'concurrent': copies, 'device': results[0]['device'],
            'img_per_s': sum(r['img_per_s'] for r in results),
            'per_run_img_per_s': [r['img_per_s'] for r in results]}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def under_torchrun(name, device, path, batch_size, warmup, steps, processes, sizes):
    """One configuration trained by `processes` processes under torchrun (one
    GPU each with NCCL, or CPU processes with gloo), `batch_size` being the
    global batch, as the training scripts run it: the step time includes the
    gradient all-reduce and the global-batch BatchNorm. On the CPU each process
    gets an equal share of the cores (unless OMP_NUM_THREADS is set). Returns
    rank 0's measurement."""
    env = dict(os.environ)
    if torch.device(device).type != 'cuda' and 'OMP_NUM_THREADS' not in env:
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // processes))
    for attempt in range(2):  # once more if the free port was taken before the rendezvous bound it
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1',
               f'--nproc_per_node={processes}', '--master_addr=127.0.0.1', f'--master_port={free_port()}',
               os.path.abspath(__file__), '--worker', name, '--device', device, '--batch_size',
               str(batch_size), '--warmup', str(warmup), '--steps', str(steps), '--n_train', str(sizes[0]),
               '--n_test', str(sizes[1]), '--paths', path]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if p.returncode == 0 or 'Address already in use' not in p.stderr:
            break
    lines = [line for line in p.stdout.splitlines() if line.startswith('{')]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f'torchrun with {processes} processes failed (exit {p.returncode}): '
                           f'{(p.stderr.strip().splitlines() or ["no output"])[-1]}')
    return {**json.loads(lines[-1]), 'threads_per_process': env.get('OMP_NUM_THREADS')}


class BenchHelpFormatter(HelpFormatter):
    """--help that never breaks a configuration's name (kd-st) at its hyphen."""

    def _split_lines(self, text, width):
        return textwrap.wrap(' '.join(text.split()), width, break_on_hyphens=False)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=BenchHelpFormatter)
    parser.add_argument('--configs', nargs='+', default=None, metavar='PATTERN',
                        help=f'configurations (shell patterns) among: {" ".join(config_names())} '
                             f'[every one on CUDA; {" ".join(CPU_CONFIGS)} on the CPU]')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cuda, cuda:N or cpu [cuda when available, else cpu]')
    parser.add_argument('--paths', nargs='+', choices=sorted(PATHS), default=None,
                        help='variants to time, the first is the one compared with the others '
                             '[graphs eager fp32 on CUDA, fp32 on the CPU]')
    parser.add_argument('--batch_size', type=int, default=128, help='training batch size')
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps [50 on CUDA, 2 on the CPU]')
    parser.add_argument('--steps', type=int, default=None, help='timed steps [200 on CUDA, 5 on the CPU]')
    parser.add_argument('--concurrent', type=int, nargs='+', default=None, metavar='N',
                        help='aggregate throughput of N copies at once, for each N given [off]')
    parser.add_argument('--processes', type=int, nargs='+', default=None, metavar='N',
                        help='time each configuration trained by N processes under torchrun (one GPU '
                             'each, or CPU processes with gloo), for each N given; --batch_size is '
                             'the global batch')
    parser.add_argument('--shared', type=int, nargs='+', default=None, metavar='K',
                        help='for each K given: K students (the KD configurations selected, in '
                             'turn) on one teacher pass against K separate runs\' steps [off]')
    parser.add_argument('--json', default=None, help='write the results here [not written]')
    parser.add_argument('--n_train', type=int, default=50000,
                        help='synthetic training images: the epoch that s/epoch is reckoned for')
    parser.add_argument('--n_test', type=int, default=10000,
                        help=f'synthetic test images of the epoch\'s test pass (the CPU times '
                             f'{CPU_TEST_IMAGES} of them and scales)')
    parser.add_argument('--start_delay', type=float, default=None,
                        help='--concurrent: seconds before the timed window [30 + 10 per copy]')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--start_at', type=float, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    gpu = args.device.startswith('cuda')
    paths = args.paths or (['graphs', 'eager', 'fp32'] if gpu else ['fp32'])
    warmup = args.warmup if args.warmup is not None else (50 if gpu else 2)
    steps = args.steps if args.steps is not None else (200 if gpu else 5)
    if args.worker:
        device = args.device
        if 'LOCAL_RANK' in os.environ:  # one of --processes' torchrun processes
            device = init_distributed(device)
        try:
            result = measure(args.worker, device, paths[0], args.batch_size, warmup, steps,
                             args.start_at, args.n_train, args.n_test)
            if WORLD.main:
                print(json.dumps(result))
        finally:
            leave_distributed()
        return
    if args.processes and args.concurrent:
        parser.error('--processes and --concurrent exclude each other')
    for n in args.processes or ():
        if n < 1 or args.batch_size % n:
            parser.error(f'--processes {n}: the global --batch_size {args.batch_size} must divide '
                         f'into {n} equal shares')
    configs = args.configs or (['*'] if gpu else CPU_CONFIGS)
    names = [n for n in config_names() if any(fnmatch.fnmatch(n, p) for p in configs)]
    if not names:
        parser.error(f'no configuration matches {" ".join(configs)}')
    if args.shared:
        from kd_losses.__main__ import sharing
        reasons = sharing()
        kd = [n for n in names if n.startswith('kd-') and not reasons[n[len('kd-'):]]]
        for n in names:
            if n.startswith('kd-') and reasons[n[len('kd-'):]]:
                print(f'--shared: {n} left out: {reasons[n[len("kd-"):]]}', flush=True)
        if not kd:
            parser.error('--shared: select KD configurations that can share a teacher pass (e.g. '
                         '--configs kd-st or \'kd-*\')')
        print(f"bench.py on {describe_device(args.device)}: K students of {TEACHER} -> {STUDENT} "
              f"({' '.join(kd)}, in turn) on one teacher pass against K separate runs, for K = "
              f"{' '.join(map(str, args.shared))}; {warmup} untimed and {steps} timed steps of batch "
              f"{args.batch_size}", flush=True)
        results = []
        for path in paths:
            for k in args.shared:
                results.append(shared_teacher_runs(kd, args.device, path, args.batch_size, warmup,
                                                   steps, k, args.n_train))
                r = results[-1]
                print(f"K={k} {path}: shared {r['shared']['img_per_s']:.0f} img/s in all, separate "
                      f"{r['separate']['img_per_s']:.0f} ({r['speedup']:.2f}x)", flush=True)
        print()
        print(markdown(results, paths))
        write_json(args.json, argv, results)
        return
    runs = [(name, path) for name in names for path in paths]
    timed_test = args.n_test if gpu else min(args.n_test, CPU_TEST_IMAGES)
    print(f"bench.py on {describe_device(args.device)}: timing {len(runs)} run(s), "
          f"{' '.join(names)} on the {' '.join(paths)} path(s); each builds its networks, "
          f"then {warmup} untimed and {steps} timed training steps of batch {args.batch_size} "
          f"and a test pass over {timed_test} images"
          + (f' (scaled to --n_test {args.n_test})' if timed_test != args.n_test else ''), flush=True)
    results = []
    for name in names:
        for path in paths:
            print(f'[{runs.index((name, path)) + 1}/{len(runs)}] {name} {path} ...', flush=True)
            if args.concurrent:
                for copies in args.concurrent:
                    delay = args.start_delay if args.start_delay is not None else 30 + 10 * copies
                    results.append(concurrent(name, args.device, path, args.batch_size, warmup, steps,
                                              copies, (args.n_train, args.n_test), delay))
                    r = results[-1]
                    print(f"{name} {path} x{copies}: {r['img_per_s']:.0f} img/s in all", flush=True)
            elif args.processes:
                for n in args.processes:
                    if gpu and n > torch.cuda.device_count():
                        print(f'{name} {path} x{n} processes: skipped, {torch.cuda.device_count()} '
                              f'GPU(s) visible', flush=True)
                        continue
                    results.append(under_torchrun(name, args.device, path, args.batch_size, warmup,
                                                  steps, n, (args.n_train, args.n_test)))
                    r = results[-1]
                    print(f"{name} {path} x{n} processes: {r['wall_ms_per_step']:.1f} ms/step, "
                          f"{r['img_per_s']:.0f} img/s", flush=True)
            else:
                results.append(measure(name, args.device, path, args.batch_size, warmup, steps,
                                       n_train=args.n_train, n_test=args.n_test))
                r = results[-1]
                print(f"{name} {path}: {r['img_per_s']:.0f} img/s, {r['s_per_epoch']:.2f} s/epoch",
                      flush=True)
    print()
    print(markdown(results, paths))
    write_json(args.json, argv, results)


def write_json(path, argv, results):
    if path:
        with open(path, 'w') as f:
            json.dump({'command': ' '.join(['python', 'bench.py'] + (argv if argv is not None else sys.argv[1:])),
                       'date': time.strftime('%Y-%m-%d'), 'torch': torch.__version__,
                       'python': platform.python_version(), 'results': results}, f, indent=2)


def markdown(results, paths):
    if any('students' in r for r in results):  # --shared
        rows = ['| students | path | shared img/s per student | shared img/s in all | separate img/s per '
                'student | separate img/s in all | shared vs separate | peak MiB shared / separate |',
                '|---|---|---|---|---|---|---|---|']
        for r in results:
            s, p = r['shared'], r['separate']
            mem = (f"{s['peak_mem_mb']:.0f} / {p['peak_mem_mb']:.0f}" if s['peak_mem_mb'] else '')
            rows.append(f"| {r['config']} | {r['path']} | {s['img_per_s_per_student']:.1f} | "
                        f"{s['img_per_s']:.1f} | {p['img_per_s_per_student']:.1f} | {p['img_per_s']:.1f} | "
                        f"{r['speedup']:.2f}x | {mem} |")
        return '\n'.join(rows)
    if any('threads_per_process' in r for r in results):  # --processes
        rows = ['| config | path | processes | ms/step | img/s | step path |', '|---|---|---|---|---|---|']
        rows += [f"| {r['config']} | {r['path']} | {r['processes']} | {r['wall_ms_per_step']:.1f} | "
                 f"{r['img_per_s']:.0f} | {r['step_path']} |" for r in results]
        return '\n'.join(rows)
    if any('concurrent' in r for r in results):
        rows = ['| config | path | runs at once | img/s in all | img/s per run |', '|---|---|---|---|---|']
        rows += [f"| {r['config']} | {r['path']} | {r['concurrent']} | "
                 f"{r['img_per_s']:.0f} | {', '.join(f'{x:.0f}' for x in r['per_run_img_per_s'])} |"
                 for r in results]
        return '\n'.join(rows)
    header = ['config'] + [f'{p} s/epoch' for p in paths] + [f'{paths[0]} vs {p}' for p in paths[1:]]
    header += ['GPU ms/step', 'wall ms/step', 'peak MiB']
    rows = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    by_name = {}
    for r in results:
        by_name.setdefault(r['config'], {})[r['path']] = r
    for name, by_path in by_name.items():
        cells = [f"{by_path[p]['s_per_epoch']:.2f}" if p in by_path else '' for p in paths]
        first = by_path.get(paths[0])
        cells += [f"{by_path[p]['s_per_epoch'] / first['s_per_epoch']:.2f}x" if first and p in by_path
                  else '' for p in paths[1:]]
        cells += [f"{first['gpu_ms_per_step']:.2f}" if first and first['gpu_ms_per_step'] else '',
                  f"{first['wall_ms_per_step']:.2f}" if first else '',
                  f"{first['peak_mem_mb']:.0f}" if first and first['peak_mem_mb'] else '']
        rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


if __name__ == '__main__':
    main()
