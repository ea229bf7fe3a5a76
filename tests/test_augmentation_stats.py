"""The training pipeline's statistics: over many draws, every reflect-padded
crop offset (9 x 9 for a padding of 4) and both flips occur equally often,
each output is exactly a crop of numpy.pad(mode='reflect') of its own image,
and batches are normalised with the published CIFAR constants (written out
here, not read from the code)."""
import math

import numpy as np
import pytest
import torch

from dataset import DATASETS, DeviceLoader, augment, reflect_index

PAD, SIZE = 4, 32
N = 20000

# Published per-channel statistics of the training splits (0..1 scale).
PUBLISHED = {
    'cifar10': {'mean': (0.4914, 0.4822, 0.4465), 'std': (0.2470, 0.2435, 0.2616)},
    'cifar100': {'mean': (0.5071, 0.4865, 0.4409), 'std': (0.2673, 0.2564, 0.2762)},
}


def chi2_critical(df, z=5.0):
    """Upper quantile of chi-square(df) at the normal quantile z (Wilson-Hilferty);
    z = 5 is a tail of about 3e-7: a correct sampler essentially never exceeds it."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts):
    counts = np.asarray(counts, dtype=np.float64).ravel()
    expected = counts.sum() / counts.size
    return ((counts - expected) ** 2 / expected).sum()


def padded_positions():
    """Source index of each position of a reflect-padded axis, from numpy."""
    return np.pad(np.arange(SIZE), PAD, mode='reflect')


def candidate_sequences():
    """Source rows of the 9 vertical offsets [9, 32]; source columns of the
    9 horizontal offsets x (unflipped, flipped) [9, 2, 32]."""
    src = padded_positions()
    rows = np.stack([src[d:d + SIZE] for d in range(2 * PAD + 1)])
    cols = np.stack([np.stack([src[d:d + SIZE], src[d:d + SIZE][::-1]]) for d in range(2 * PAD + 1)])
    return rows, cols


def coded_images(n):
    """Channel 0 encodes the row (8 r), channel 1 the column (8 c), channel 2 the
    sample and the position ((37 i + 5 r + 11 c) mod 256): every output pixel's
    source row, column and image can be read back."""
    r, c = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing='ij')
    imgs = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    imgs[:, 0] = 8 * r
    imgs[:, 1] = 8 * c
    # uint8 addition wraps modulo 256
    imgs[:, 2] = ((37 * np.arange(n)) % 256).astype(np.uint8)[:, None, None] + ((5 * r + 11 * c) % 256).astype(np.uint8)
    return torch.from_numpy(imgs)


def recover(out, index):
    """For uint8 outputs of coded images (sample i = index[k]): (dy, dx, flip) per
    output, checking that each output is exactly that crop of its own image."""
    rows, cols = candidate_sequences()
    assert len({tuple(s) for s in cols.reshape(-1, SIZE)}) == 18  # all 18 distinguishable
    parts = [_recover_chunk(o, i, rows, cols)
             for o, i in zip(out.split(2000), np.array_split(np.asarray(index), range(2000, len(out), 2000)))]
    return tuple(np.concatenate(p) for p in zip(*parts))


def _recover_chunk(out, index, rows, cols):
    out = out.numpy()
    n = len(out)
    row_seq = out[:, 0, :, 0].astype(np.int64) // 8                   # [n, 32] source rows
    col_seq = out[:, 1, 0, :].astype(np.int64) // 8                   # [n, 32] source columns
    row_hit = (row_seq[:, None, :] == rows[None]).all(-1)             # [n, 9]
    col_hit = (col_seq[:, None, None, :] == cols[None]).all(-1)       # [n, 9, 2]
    assert (row_hit.sum(1) == 1).all(), 'an output row order is no reflect-padded crop'
    assert (col_hit.reshape(n, -1).sum(1) == 1).all(), 'an output column order is no crop'
    dy = row_hit.argmax(1)
    dx, flip = np.divmod(col_hit.reshape(n, -1).argmax(1), 2)
    # the whole image, every channel, from the recovered offsets
    src_r = rows[dy][:, :, None]                                       # [n, 32, 1]
    src_c = cols[dx, flip][:, None, :]                                 # [n, 1, 32]
    i = np.asarray(index)[:, None, None]
    expected = np.stack([np.broadcast_to(8 * src_r, (n, SIZE, SIZE)),
                         np.broadcast_to(8 * src_c, (n, SIZE, SIZE)),
                         (37 * i + 5 * src_r + 11 * src_c) % 256], axis=1)
    assert np.array_equal(out, expected), 'an output is not a crop of its own image'
    return dy, dx, flip


@pytest.fixture(scope='module')
def draws():
    imgs = coded_images(N)
    g = torch.Generator().manual_seed(12345)
    out = torch.cat([augment(chunk, g) for chunk in imgs.split(5000)])
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    return recover(out, np.arange(N))


# ----------------------------------------------------------------------------- reflect padding

def test_reflect_index_is_numpy_reflect_padding():
    pos = torch.arange(-(SIZE - 1), 2 * SIZE - 1)
    assert np.array_equal(reflect_index(pos, SIZE).numpy(), np.pad(np.arange(SIZE), SIZE - 1, mode='reflect'))
    pos = torch.arange(-4, 9)
    assert np.array_equal(reflect_index(pos, 5).numpy(), np.pad(np.arange(5), 4, mode='reflect'))
    # by hand: the edge is not repeated (reflect, not symmetric/replicate)
    hand = {-1: 1, -4: 4, 0: 0, 31: 31, 32: 30, 35: 27}
    got = reflect_index(torch.tensor(list(hand)), SIZE).tolist()
    assert got == list(hand.values())


def test_a_corner_crop_is_numpy_reflect_padding_of_the_image():
    # a random image; the outputs drawn at offset (0, 0) and (8, 8) unflipped are the
    # padded image's corners, borders included
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (1, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    padded = np.pad(img[0].numpy(), ((0, 0), (PAD, PAD), (PAD, PAD)), mode='reflect')
    assert padded[0, 0, 0] == img[0, 0, 4, 4].item()  # numpy's reflect, as written out
    batch = img.expand(3000, 3, SIZE, SIZE).contiguous()
    out = augment(batch, torch.Generator().manual_seed(4)).numpy()
    crops = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy:dy + SIZE, dx:dx + SIZE]
            crops.setdefault(crop.tobytes(), (dy, dx, 0))
            crops.setdefault(crop[:, :, ::-1].tobytes(), (dy, dx, 1))
    assert len(crops) == 162
    found = set()
    for o in out:
        key = o.tobytes()
        assert key in crops, 'an output is no crop of the reflect-padded image'
        found.add(crops[key])
    # 3000 draws of 162 outcomes: each one occurs (a miss has probability 162 * e^-18.5)
    assert found == set(crops.values())


# ----------------------------------------------------------------------------- frequencies

def test_every_offset_occurs_equally_often_on_each_axis(draws):
    dy, dx, _ = draws
    for axis in (dy, dx):
        counts = np.bincount(axis, minlength=2 * PAD + 1)
        assert len(counts) == 9 and (counts > 0).all(), f'offsets drawn: {np.nonzero(counts)[0]}'
        # N/9 = 2222 each; 5 standard deviations of a binomial count is about 235
        assert np.abs(counts - N / 9).max() < 5 * math.sqrt(N / 9 * 8 / 9), counts
        assert chi2(counts) < chi2_critical(8), counts


def test_the_81_crop_positions_are_uniform_and_axes_independent(draws):
    dy, dx, _ = draws
    joint = np.zeros((9, 9))
    np.add.at(joint, (dy, dx), 1)
    assert (joint > 0).all()
    assert chi2(joint) < chi2_critical(80), joint


def test_both_flips_occur_equally_often_and_independently_of_the_offset(draws):
    dy, dx, flip = draws
    n_flip = int(flip.sum())
    assert abs(n_flip - N / 2) < 5 * math.sqrt(N / 4), n_flip
    cells = np.zeros((9, 9, 2))
    np.add.at(cells, (dy, dx, flip), 1)
    assert chi2(cells) < chi2_critical(161)


def test_successive_batches_draw_anew():
    imgs = coded_images(2000)
    g = torch.Generator().manual_seed(7)
    a = recover(augment(imgs, g), np.arange(2000))
    b = recover(augment(imgs, g), np.arange(2000))
    same = (a[0] == b[0]) & (a[1] == b[1]) & (a[2] == b[2])
    assert same.mean() < 0.05  # 1/162 expected by chance


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_normalisation_constants_are_the_published_values(name):
    info = DATASETS[name]
    assert tuple(info.mean) == pytest.approx(PUBLISHED[name]['mean'], abs=1e-6)
    assert tuple(info.std) == pytest.approx(PUBLISHED[name]['std'], abs=1e-6)


def published(name):
    mean = torch.tensor(PUBLISHED[name]['mean'], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(PUBLISHED[name]['std'], dtype=torch.float64).view(1, 3, 1, 1)
    return mean, std


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_evaluation_batch_is_the_pixels_normalised_with_published_constants(name):
    # per-channel different values, so a swapped channel constant shows
    imgs = coded_images(12)
    loader = DeviceLoader(imgs, torch.arange(12) % 10, DATASETS[name], 5, 'cpu', train=False)
    mean, std = published(name)
    batches = list(loader)
    got = torch.cat([b.img for b in batches]).double()
    assert torch.equal(torch.cat([b.idx for b in batches]), torch.arange(12))
    expected = (imgs.double() / 255 - mean) / std
    assert torch.allclose(got, expected, atol=1e-5)
    # one pixel by hand: sample 0, channel 1, row 0, column 3 holds 8 * 3 = 24
    m, s = PUBLISHED[name]['mean'][1], PUBLISHED[name]['std'][1]
    assert got[0, 1, 0, 3].item() == pytest.approx((24 / 255 - m) / s, abs=1e-5)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_training_batch_is_the_normalised_crop_of_the_right_images(name):
    n = 300
    imgs = coded_images(n)
    labels = torch.arange(n) % 10
    loader = DeviceLoader(imgs, labels, DATASETS[name], 128, 'cpu', train=True, seed=1)
    mean, std = published(name)
    seen = []
    for batch in loader:
        assert torch.equal(batch.target, labels[batch.idx])
        pixels = (batch.img.double() * std + mean) * 255        # undo the published normalisation
        assert torch.allclose(pixels, pixels.round(), atol=2e-3), 'not (x/255 - mean)/std'
        # each sample is a crop of its own dataset image (channel 2 encodes the index)
        recover(pixels.round().to(torch.uint8), batch.idx.numpy())
        seen.append(batch.idx)
    assert sorted(torch.cat(seen).tolist()) == list(range(n))
