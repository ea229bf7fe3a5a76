import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_cifar
from dataset import DATASETS, DataError, DeviceLoader, augment, load_cifar


@pytest.mark.parametrize('name, n_train, n_test', [('cifar10', 60, 20), ('cifar100', 230, 110)])
def test_reads_the_standard_layout(tmp_path, name, n_train, n_test):
    written = write_cifar(str(tmp_path), name, n_train, n_test)
    train_x, train_y, test_x, test_y = load_cifar(str(tmp_path), name, download=False, log=lambda m: None)
    assert train_x.dtype == torch.uint8 and train_x.shape == (n_train, 3, 32, 32)
    assert test_x.shape == (n_test, 3, 32, 32) and train_y.dtype == torch.int64
    # Row-major CHW as in the official files: channel 0 is the first 1024 bytes.
    assert np.array_equal(train_x.reshape(n_train, -1).numpy(), written['train'][0])
    assert np.array_equal(train_y.numpy(), written['train'][1])
    assert np.array_equal(test_x.reshape(n_test, -1).numpy(), written['test'][0])
    assert np.array_equal(test_y.numpy(), written['test'][1])
    assert int(train_y.max()) == DATASETS[name].num_class - 1


def corrupt(path, how):
    if how == 'truncated':
        data = open(path, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
        return 'cannot be read'
    with open(path, 'rb') as f:
        entry = pickle.load(f, encoding='latin1')
    if how == 'shape':
        entry['data'] = entry['data'][:, :3000]
        expect = 'shape'
    elif how == 'dtype':
        entry['data'] = entry['data'].astype(np.float32)
        expect = 'uint8'
    elif how == 'labels':
        entry['labels'][0] = 10
        expect = r'labels must lie in \[0, 10\)'
    elif how == 'count':
        entry['labels'] = entry['labels'][:-1]
        expect = 'images but'
    else:
        del entry['data']
        expect = 'missing key'
    with open(path, 'wb') as f:
        pickle.dump(entry, f)
    return expect


@pytest.mark.parametrize('how', ['truncated', 'shape', 'dtype', 'labels', 'count', 'key'])
def test_rejects_a_corrupted_file_naming_it(tmp_path, how):
    write_cifar(str(tmp_path), 'cifar10', 50, 10)
    bad = os.path.join(str(tmp_path), 'cifar-10-batches-py', 'data_batch_3')
    expect = corrupt(bad, how)
    with pytest.raises(DataError, match=expect) as err:
        load_cifar(str(tmp_path), 'cifar10', download=False, log=lambda m: None)
    assert bad in str(err.value)


def test_missing_data_without_download_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar(str(tmp_path), 'cifar100', download=False)
    msg = str(err.value)
    assert os.path.join(str(tmp_path), 'cifar-100-python') in msg
    assert '--no_download' in msg and 'cs.toronto.edu' in msg


def test_failed_download_is_a_message(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError('Network is unreachable')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline)
    with pytest.raises(DataError, match='Downloading it failed.*Network is unreachable'):
        load_cifar(str(tmp_path), 'cifar10', download=True, log=lambda m: None)


def ramp_images(n):
    """Image i: value 100*c + 3*col + row... distinct per pixel, plus a per-sample offset."""
    rows = torch.arange(32)[:, None]
    cols = torch.arange(32)[None, :]
    base = (rows * 3 + cols * 5) % 200
    imgs = torch.stack([torch.stack([(base + 17 * c + i) % 256 for c in range(3)]) for i in range(n)])
    return imgs.to(torch.uint8)


def candidate_crops(img, pad=4):
    """All reflect-padded 32x32 crops of one image, flipped or not (independent reference)."""
    padded = F.pad(img[None].float(), (pad,) * 4, mode='reflect')[0]
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + 32, dx:dx + 32]
            out += [(dy, dx, False, crop), (dy, dx, True, crop.flip(-1))]
    return out


def test_augmentation_is_a_reflect_crop_and_flip_varying_across_samples():
    imgs = ramp_images(24)
    g = torch.Generator().manual_seed(0)
    out = augment(imgs, g)
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    seen = set()
    for i in range(len(imgs)):
        matches = [(dy, dx, flip) for dy, dx, flip, crop in candidate_crops(imgs[i])
                   if torch.equal(crop, out[i].float())]
        assert matches, f'sample {i} is not a reflect-padded crop of its own image'
        seen.add(matches[0])
    assert len(seen) > 12                       # different crops across samples
    assert {m[2] for m in seen} == {True, False}  # some flipped, some not


def test_loader_batches_align_labels_indices_and_normalise(tmp_path):
    info = DATASETS['cifar10']
    n = 70
    # Constant images whose value encodes the sample: crops and flips keep it.
    g = torch.Generator().manual_seed(0)
    values = torch.randperm(256, generator=g)[:n].to(torch.uint8)
    imgs = values[:, None, None, None].expand(n, 3, 32, 32).contiguous()
    labels = torch.randint(0, 10, (n,), generator=g)
    loader = DeviceLoader(imgs, labels, info, batch_size=32, device='cpu', train=True, seed=3)
    assert len(loader) == 3
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    seen = []
    for batch in loader:
        assert batch.img.dtype == torch.float32 and batch.img.shape[1:] == (3, 32, 32)
        assert torch.equal(batch.target, labels[batch.idx])
        expected = (values[batch.idx].float()[:, None, None, None] / 255 - mean) / std
        assert torch.allclose(batch.img, expected.expand_as(batch.img), atol=1e-5)
        seen.append(batch.idx)
    seen = torch.cat(seen)
    assert [len(b) for b in torch.split(seen, 32)] == [32, 32, 6]  # the last partial batch is kept
    assert sorted(seen.tolist()) == list(range(n))                 # every sample once per epoch
    lo = ((0 - mean) / std).min()
    hi = ((1 - mean) / std).max()
    assert lo <= batch.img.min() and batch.img.max() <= hi


def test_loader_order_is_seeded_and_restorable():
    info = DATASETS['cifar10']
    imgs = ramp_images(40)
    labels = torch.arange(40) % 10

    def epoch(loader):
        return [(b.idx.clone(), b.img.clone()) for b in loader]

    a = DeviceLoader(imgs, labels, info, 16, 'cpu', train=True, seed=5)
    b = DeviceLoader(imgs, labels, info, 16, 'cpu', train=True, seed=5)
    first = epoch(a)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, epoch(b)))
    state = a.state_dict()
    second = epoch(a)
    assert not torch.equal(torch.cat([x[0] for x in first]), torch.cat([x[0] for x in second]))
    a.load_state_dict(state)
    again = epoch(a)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(second, again))


def test_evaluation_loader_is_in_order_and_unaugmented():
    info = DATASETS['cifar10']
    imgs = ramp_images(25)
    loader = DeviceLoader(imgs, torch.arange(25) % 10, info, 10, 'cpu', train=False)
    batches = list(loader)
    assert [len(b.idx) for b in batches] == [10, 10, 5]
    assert torch.equal(torch.cat([b.idx for b in batches]), torch.arange(25))
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    assert torch.allclose(batches[0].img, (imgs[:10].float() / 255 - mean) / std, atol=1e-5)


def test_sharded_batches_match_the_single_process_batch():
    info = DATASETS['cifar10']
    imgs = ramp_images(48)
    labels = torch.arange(48) % 10
    single = list(DeviceLoader(imgs, labels, info, 16, 'cpu', train=True, seed=9))
    shards = [list(DeviceLoader(imgs, labels, info, 16, 'cpu', train=True, seed=9, rank=r, world=2))
              for r in range(2)]
    for k, batch in enumerate(single):
        assert len(shards[0][k].idx) == len(shards[1][k].idx) == len(batch.idx) // 2
        assert torch.equal(torch.cat([shards[0][k].idx, shards[1][k].idx]), batch.idx)
        assert torch.equal(torch.cat([shards[0][k].img, shards[1][k].img]), batch.img)


def test_sharded_partial_batches():
    info = DATASETS['cifar10']
    imgs, labels = ramp_images(21), torch.arange(21) % 10
    train = [list(DeviceLoader(imgs, labels, info, 9, 'cpu', train=True, seed=1, rank=r, world=3))
             for r in range(3)]
    # 21 = 9 + 9 + 3... with a last batch of 3: one sample per rank
    assert [[len(b.idx) for b in shard] for shard in train] == [[3, 3, 1]] * 3
    cut = [list(DeviceLoader(ramp_images(23), torch.arange(23) % 10, info, 9, 'cpu', train=True,
                             seed=1, rank=r, world=3)) for r in range(3)]
    # 23 = 9 + 9 + 5: the partial batch is cut to 3
    assert [[len(b.idx) for b in shard] for shard in cut] == [[3, 3, 1]] * 3
    test = [list(DeviceLoader(imgs, labels, info, 8, 'cpu', train=False, rank=r, world=3))
            for r in range(3)]
    seen = torch.cat([b.idx for shard in test for b in shard])
    assert sorted(seen.tolist()) == list(range(21))  # evaluation: every image exactly once
