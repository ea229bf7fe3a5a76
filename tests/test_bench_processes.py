"""bench.py under torchrun (--processes): the same configuration trained by one
and by two processes (CPU processes with gloo here), each result measured by
rank 0 and saying which step path ran; and the graphs path off CUDA recorded
as the eager run it is."""
import json

import pytest

import bench

SMALL = ['--device', 'cpu', '--batch_size', '16', '--warmup', '1', '--steps', '2', '--n_train', '64',
         '--n_test', '32']


def test_one_and_two_processes_under_torchrun(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    bench.main(['--configs', 'base-r20', '--paths', 'fp32', '--processes', '1', '2', '--json', str(out)] + SMALL)
    results = json.load(open(out))['results']
    assert [(r['config'], r['path'], r['processes']) for r in results] == [('base-r20', 'fp32', 1),
                                                                           ('base-r20', 'fp32', 2)]
    for r in results:
        assert r['wall_ms_per_step'] > 0 and r['img_per_s'] > 0 and r['finite']
        assert r['batch_size'] == 16 and r['timed_steps'] == 2  # the global batch, split by the processes
        assert r['step_path'] == 'eager' and r['threads_per_process']
    table = capsys.readouterr().out
    assert '| base-r20 | fp32 | 1 |' in table and '| base-r20 | fp32 | 2 |' in table


def test_a_global_batch_that_does_not_split_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(['--configs', 'base-r20', '--processes', '3'] + SMALL)
    assert 'must divide into 3 equal shares' in capsys.readouterr().err


def test_the_graphs_path_off_cuda_records_that_it_ran_eagerly():
    r = bench.measure('base-r20', 'cpu', 'graphs', 16, 1, 2, n_train=64, n_test=32)
    assert r['step_path'] == 'eager' and 'CUDA graphs need a CUDA device' in r['step_fallback']
    assert r['processes'] == 1
