"""Mutation check: do the tests catch the bugs that matter?

Plants each bug of MUTATIONS, one at a time, in a temporary copy of the
repository (the files git knows: tracked plus untracked, not ignored, so the
working tree as it is), runs the tests chosen for that bug with `-x -q`, and
reports which bugs survive. Not part of CI: it runs many test selections.

    python tools/mutate.py                 # every mutation; exit 1 if any survives
    python tools/mutate.py st_T at_batch   # the mutations whose names start so
    python tools/mutate.py --list          # names, files and test selections

A mutation names its file, the exact text to replace (it must occur exactly
`count` times: a mutation that no longer matches the code stops the run, so the
list stays in step with the code), the replacement, and the tests to run.
First the chosen test selections run on the unmutated copy: they must pass,
or every bug would look caught.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: Sequence[str]
    what: str = ''
    count: int = 1


MUTATIONS = [
    # ---- the bugs that survived the suite before these tests existed
    Mutation('st_T_not_T2', 'kd_losses/st.py',
             "log_target=True) * self.T ** 2", "log_target=True) * self.T",
             ['tests/test_loss_st_at.py'], 'ST scaled by T instead of T^2'),
    Mutation('st_kl_swapped', 'kd_losses/st.py',
             'F.kl_div(log_p_s, log_p_t,', 'F.kl_div(log_p_t, log_p_s,',
             ['tests/test_loss_st_at.py'], 'ST: KL(student || teacher) instead of KL(teacher || student)'),
    Mutation('at_batch_norm', 'kd_losses/at.py',
             'am / (am.norm(dim=1, keepdim=True) + eps)', 'am / (am.norm() + eps)',
             ['tests/test_loss_st_at.py'], 'AT maps normalised over the whole batch'),
    Mutation('kd_step_detached', 'train_kd.py',
             'loss = self.args.ce_weight * ce + self.kd_scale * kd\n',
             'loss = self.args.ce_weight * ce + self.kd_scale * kd.detach()\n',
             ['tests/test_kd_step.py'], 'the KD term gives no gradient (step level)'),
    Mutation('kd_step_detached_run', 'train_kd.py',
             'loss = self.args.ce_weight * ce + self.kd_scale * kd\n',
             'loss = self.args.ce_weight * ce + self.kd_scale * kd.detach()\n',
             ['tests/test_train_kd.py::test_every_mode_trains_and_evaluates[at]'],
             'the KD term gives no gradient (a whole run of one mode)'),
    Mutation('crop_8_offsets', 'dataset.py',
             'torch.randint(0, 2 * pad + 1, (2, b)', 'torch.randint(0, 2 * pad, (2, b)',
             ['tests/test_augmentation_stats.py'], 'crop offsets drawn from 8 values per axis, not 9'),
    Mutation('cifar10_std_swapped', 'dataset.py',
             '(0.2470, 0.2435, 0.2616)', '(0.2435, 0.2470, 0.2616)',
             ['tests/test_augmentation_stats.py'], 'CIFAR-10 std of channels 0 and 1 swapped'),
    # ---- more of the same kinds
    Mutation('no_flips', 'dataset.py',
             'flips = torch.randint(0, 2, (b,)', 'flips = torch.randint(0, 1, (b,)',
             ['tests/test_augmentation_stats.py'], 'never flipped'),
    Mutation('replicate_padding', 'dataset.py',
             'return (size - 1) - ((size - 1) - pos.abs()).abs()', 'return pos.clamp(0, size - 1)',
             ['tests/test_augmentation_stats.py'], 'replicate padding instead of reflect'),
    Mutation('cifar100_mean', 'dataset.py',
             '(0.5071, 0.4865, 0.4409)', '(0.4914, 0.4822, 0.4465)',
             ['tests/test_augmentation_stats.py'], "CIFAR-100 normalised with CIFAR-10's mean"),
    Mutation('at_p_ignored', 'kd_losses/at.py',
             'fm.abs().pow(self.p)', 'fm.abs().pow(2)',
             ['tests/test_loss_st_at.py'], 'AT ignores --p'),
    Mutation('st_sum_not_mean', 'kd_losses/st.py',
             "reduction='batchmean'", "reduction='sum'",
             ['tests/test_loss_st_at.py'], 'ST summed over the batch'),
    Mutation('crd_c_off_by_one', 'kd_losses/crd.py',
             'c = (probs.shape[1] - 1) / self.n_data', 'c = probs.shape[1] / self.n_data',
             ['tests/test_loss_crd.py', 'tests/test_kd_step.py'], 'CRD noise ratio counts the positive'),
    Mutation('crd_z_per_batch', 'kd_losses/crd.py',
             'z.copy_(torch.where(z > 0, z, mean * self.n_data))', 'z.copy_(mean * self.n_data)',
             ['tests/test_loss_crd.py'], 'CRD normaliser Z recomputed every batch'),
    Mutation('crd_embed_frozen', 'kd_losses/crd.py',
             'v_s = self.embed(self.embed_s, feat_s)', 'v_s = self.embed(self.embed_s, feat_s).detach()',
             ['tests/test_kd_step.py'], "CRD's student embedding gets no gradient"),
    Mutation('pkt_direction', 'kd_losses/pkt.py',
             'return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()',
             'return (p_s * torch.log((p_s + self.eps) / (p_t + self.eps))).mean()',
             ['tests/test_loss_pkt_sp_cc.py'], 'PKT KL direction swapped'),
    Mutation('vid_no_variance', 'kd_losses/vid.py',
             '(mean - fm_t.float()).pow(2) / var)', '(mean - fm_t.float()).pow(2))',
             ['tests/test_loss_vid.py', 'tests/test_kd_step.py'], 'VID NLL without the variance'),
    Mutation('teacher_train_mode', 'train_kd.py',
             'teacher = memory_layout(teacher.to(device), args).eval().requires_grad_(False)',
             'teacher = memory_layout(teacher.to(device), args).requires_grad_(False)',
             ['tests/test_kd_step.py'], 'the teacher runs in train mode (BN statistics move)'),
    Mutation('sgd_no_nesterov', 'utils.py',
             'weight_decay=args.weight_decay, nesterov=args.nesterov)',
             'weight_decay=args.weight_decay, nesterov=False)',
             ['tests/test_kd_step.py'], 'plain momentum instead of Nesterov'),
    Mutation('lr_floor_milestones', 'utils.py',
             'decay_epochs = (math.ceil(epochs * 0.5), math.ceil(epochs * 0.75))',
             'decay_epochs = (epochs // 2, epochs * 3 // 4)',
             ['tests/test_weak_spots.py'], 'lr milestones rounded down'),
    Mutation('lr_drop_early', 'utils.py',
             'if epoch > e:', 'if epoch >= e:',
             ['tests/test_weak_spots.py'], 'each lr drop one epoch early'),
    Mutation('topk_unclamped', 'utils.py',
             'return torch.stack([cum[min(k, maxk) - 1] for k in ks]).float()',
             'return torch.stack([cum[min(k, maxk - 1)] for k in ks]).float()',
             ['tests/test_weak_spots.py'], 'top-k count off by one'),
    Mutation('epochstats_last_batch_only', 'utils.py',
             'self.total.add_(sums)', 'self.total.copy_(sums)',
             ['tests/test_stats.py'], 'EpochStats keeps the last batch only'),
    Mutation('summary_population_std', 'summarize.py',
             '/ (len(values) - 1))', '/ len(values))',
             ['tests/test_summary_numbers.py'], 'population instead of sample standard deviation'),
    Mutation('summary_all_phases', 'summarize.py',
             "rows = [r for r in csv.DictReader(f) if r['phase'] == 'main']",
             'rows = list(csv.DictReader(f))',
             ['tests/test_summary_numbers.py'], 'best/last over pre-training rows too'),
    # ---- the captured step, the newer methods, and what keeps a result from going wrong silently
    Mutation('sgd_nesterov_ignored', 'capture.py',
             'step = torch._foreach_add(grads, bufs, alpha=self.momentum) if self.nesterov else bufs',
             'step = bufs', ['tests/test_capture.py::test_sgd_is_torch_sgd'],
             'the capturable SGD forgets Nesterov'),
    Mutation('stats_not_reset', 'utils.py', '        self.total.zero_()\n        self.first_bad',
             '        self.first_bad',
             ['tests/test_stats.py'], "an epoch's statistics carry the previous epoch's"),
    Mutation('dkd_weights_swapped', 'kd_losses/dkd.py',
             "return {'tckd': self.alpha * tckd, 'nckd': self.beta * nckd}",
             "return {'tckd': self.beta * tckd, 'nckd': self.alpha * nckd}",
             ['tests/test_loss_dkd.py'], 'DKD weights TCKD by beta and NCKD by alpha'),
    Mutation('blown_up_epoch_saved', 'utils.py',
             '            check_epoch_result(header, test, watched, checkpointer)\n', '',
             ['tests/test_reliability.py::test_a_blown_up_epoch_is_never_saved'],
             'an epoch with a NaN test loss is saved'),
    Mutation('digest_unchecked', 'checkpoints.py', 'if stored != content_digest(ckpt):', 'if False:',
             ['tests/test_reliability.py::test_a_checkpoint_with_flipped_bytes_is_refused'],
             'a damaged checkpoint loads'),
    Mutation('unpickler_allows_all', 'dataset.py', 'if (module, name) not in _ALLOWED_GLOBALS:',
             'if False:',
             ['tests/test_reliability.py::test_a_pickle_payload_in_a_batch_file_is_refused_unrun'],
             'a CIFAR batch file may run code'),
    Mutation('no_run_lock', 'records.py', 'fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)', 'fd',
             ['tests/test_reliability.py::test_a_second_writer_on_one_run_directory_stops'],
             'two processes write one run'),
]


def repo_files(root):
    out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split('\0') if f and os.path.isfile(os.path.join(root, f))]


def copy_repo(root, dest):
    for rel in repo_files(root):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), target)


def run_tests(copy, tests, timeout):
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests]
    env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
    start = time.time()
    try:
        p = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f'timed out after {timeout}s', time.time() - start
    return p.returncode, p.stdout + p.stderr, time.time() - start


def first_failure(output):
    m = re.search(r'^(?:FAILED|ERROR) (\S+)', output, re.M)
    return m.group(1) if m else '?'


def check_text(copy, mutation):
    path = os.path.join(copy, mutation.file)
    with open(path) as f:
        text = f.read()
    found = text.count(mutation.old)
    if found != mutation.count:
        raise SystemExit(f'mutation {mutation.name}: {mutation.file} holds the text to replace '
                         f'{found} times, expected {mutation.count}; update MUTATIONS to the '
                         f'code:\n    {mutation.old!r}')
    return path, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('names', nargs='*', help='run the mutations whose names start with these')
    parser.add_argument('--list', action='store_true', help='list the mutations and exit')
    parser.add_argument('--timeout', type=int, default=900, help='seconds per test run')
    parser.add_argument('--keep', action='store_true', help='keep the temporary copy')
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or any(m.name.startswith(n) for n in args.names)]
    if not chosen:
        raise SystemExit(f'no mutation matches {args.names}')
    if args.list:
        for m in chosen:
            print(f'{m.name:28} {m.file:18} {" ".join(m.tests)}\n{"":28} {m.what}')
        return 0

    copy = tempfile.mkdtemp(prefix='kdzoo-mutate-')
    try:
        copy_repo(ROOT, copy)
        for m in chosen:  # every mutation matches the code before anything runs
            check_text(copy, m)
        selections = sorted({t for m in chosen for t in m.tests})
        print(f'baseline: {len(selections)} test selections on the unmutated copy ...', flush=True)
        rc, out, secs = run_tests(copy, selections, args.timeout * 2)
        if rc != 0:
            print(out[-4000:])
            raise SystemExit(f'the unmutated tests do not pass (exit {rc}): fix that first')
        print(f'baseline passes ({secs:.0f}s)\n', flush=True)

        results = []
        for m in chosen:
            path, original = check_text(copy, m)
            with open(path, 'w') as f:
                f.write(original.replace(m.old, m.new))
            try:
                rc, out, secs = run_tests(copy, m.tests, args.timeout)
            finally:
                with open(path, 'w') as f:
                    f.write(original)
            if rc == 0:
                verdict, by = 'SURVIVED', ''
            elif rc in (1, 2) and ('FAILED' in out or 'ERROR' in out):
                verdict, by = 'caught', first_failure(out)
            elif rc == 5:
                verdict, by = 'ERROR', 'no tests collected: fix the selection'
            else:
                verdict, by = 'ERROR', f'pytest exit {rc}: {out.strip().splitlines()[-1] if out.strip() else ""}'
            results.append((m, verdict, by, secs))
            print(f'{m.name:28} {verdict:8} {secs:5.0f}s  {by}', flush=True)

        print('\n| mutation | file | what | result | first failing test |')
        print('|---|---|---|---|---|')
        for m, verdict, by, _ in results:
            print(f'| {m.name} | {m.file} | {m.what} | {verdict} | {by} |')
        bad = [m.name for m, verdict, _, _ in results if verdict != 'caught']
        if bad:
            print(f'\n{len(bad)} of {len(results)} not caught: {", ".join(bad)}')
            return 1
        print(f'\nall {len(results)} mutations caught')
        return 0
    finally:
        if args.keep:
            print(f'copy kept in {copy}')
        else:
            shutil.rmtree(copy, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
