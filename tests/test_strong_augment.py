"""The strong view (strong_augment.py, dataset.DeviceLoader(strong_view=True)):
each operation equals torchvision's per-image implementation on fixed
values, the Cutout equals the official one as Pillow draws it, the batched
policy equals the per-image composition of the choices it drew (which
differ between the images of a batch), the generator alone decides the views
(equal seeds, equal views; a saved state replays them), a one-view loader
draws nothing for it, and the drawn operations and values follow the
official distribution."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode

from dataset import DATASETS, Batch, DeviceLoader, TwoViewBatch
from strong_augment import CUTOUT_FILL, OP_INDEX, OPS, RandAugment
from test_augmentation_stats import chi2, chi2_critical

SIZE = 32
NEAREST = InterpolationMode.NEAREST


def sample_images(n, seed=0):
    """Random images, one of a narrow range, one with a flat channel, one dark:
    the cases autocontrast and equalize treat specially."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    img[1] = img[1] // 4 + 60
    img[2, 0] = 7
    img[3] = img[3] // 16
    return img


def torchvision_op(name, img, v):
    """One image through torchvision's tensor implementation of the official op,
    in PIL's conventions: shears about the top-left corner (as torchvision's
    own RandAugment), translation by -v * size (PIL's affine (1, 0, v * w, ...))."""
    if name == 'AutoContrast':
        return TF.autocontrast(img)
    if name == 'Brightness':
        return TF.adjust_brightness(img, v)
    if name == 'Color':
        return TF.adjust_saturation(img, v)
    if name == 'Contrast':
        return TF.adjust_contrast(img, v)
    if name == 'Equalize':
        return TF.equalize(img)
    if name == 'Identity':
        return img
    if name == 'Posterize':
        return TF.posterize(img, max(1, int(v)))
    if name == 'Rotate':
        return TF.rotate(img, v, interpolation=NEAREST)
    if name == 'Sharpness':
        return TF.adjust_sharpness(img, v)
    if name == 'ShearX':
        return TF.affine(img, 0.0, [0.0, 0.0], 1.0, [math.degrees(math.atan(v)), 0.0],
                         interpolation=NEAREST, center=[0, 0])
    if name == 'ShearY':
        return TF.affine(img, 0.0, [0.0, 0.0], 1.0, [0.0, math.degrees(math.atan(v))],
                         interpolation=NEAREST, center=[0, 0])
    if name == 'Solarize':  # torchvision refuses a threshold above 255; PIL then inverts nothing
        return TF.solarize(img, v) if v <= 255 else img
    if name == 'TranslateX':
        return TF.affine(img, 0.0, [-v * SIZE, 0.0], 1.0, [0.0, 0.0], interpolation=NEAREST)
    if name == 'TranslateY':
        return TF.affine(img, 0.0, [0.0, -v * SIZE], 1.0, [0.0, 0.0], interpolation=NEAREST)
    raise KeyError(name)


def official_cutout(img, u_side, u_x, u_y):
    """The official Cutout of one uint8 image from its three uniforms, through
    Pillow: side u * 0.5 * w; centre np.random.uniform(w), i.e. w + (1 - w) * u."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    w, h = pil.size
    v = u_side * 0.5 * w
    x0, y0 = w + (1 - w) * u_x, h + (1 - h) * u_y
    x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    ImageDraw.Draw(pil).rectangle((x0, y0, x1, y1), CUTOUT_FILL)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


@pytest.mark.parametrize('name', [name for name, _, _ in OPS])
def test_each_operation_equals_torchvision_on_fixed_values(name):
    low, high = next((lo, hi) for n, lo, hi in OPS if n == name)
    img = sample_images(6)
    fractions = (0.0, 0.13, 0.37, 0.5, 0.81, 0.999)
    values = torch.tensor([low + (high - low) * f for f in fractions], dtype=torch.float64)
    got = RandAugment(SIZE, 'cpu').apply_op(img, torch.full((6,), OP_INDEX[name]), values)
    assert got.dtype == torch.uint8
    for i in range(6):
        expected = torchvision_op(name, img[i], float(values[i]))
        assert torch.equal(got[i], expected), \
            f'{name}({float(values[i]):.3f}) on image {i}: {int((got[i] != expected).sum())} pixels differ'
    if name not in ('Identity',) and name != 'Solarize':
        assert not torch.equal(got, img)  # the operation does something on these images


def test_cutout_equals_the_official_one_as_pillow_draws_it():
    img = sample_images(8)
    uniforms = torch.tensor([[0.0, 0.2, 0.5, 0.999, 0.7, 0.31, 0.05, 1.0 - 1e-9],   # side
                             [0.0, 0.5, 0.999, 0.1, 0.98, 0.6, 0.33, 0.5],          # centre x
                             [0.5, 0.0, 0.2, 0.999, 0.02, 0.4, 0.77, 0.5]],         # centre y
                            dtype=torch.float64)
    got = RandAugment(SIZE, 'cpu').cutout(img, uniforms)
    for i in range(8):
        expected = official_cutout(img[i], *uniforms[:, i].tolist())
        assert torch.equal(got[i], expected), f'image {i}: {int((got[i] != expected).sum())} pixels differ'


def test_the_batched_policy_is_each_images_own_draws_applied_in_turn():
    n = 24
    img = sample_images(n, seed=1)
    policy = RandAugment(SIZE, 'cpu')
    g = torch.Generator().manual_seed(5)
    ops, values, cutout = policy.draw(n, g)
    out = policy(img, g.manual_seed(5))
    for i in range(n):
        x = img[i]
        for k in range(2):
            x = torchvision_op(OPS[ops[k, i]][0], x, float(values[k, i]))
        x = official_cutout(x, *cutout[:, i].tolist())
        assert torch.equal(out[i], x), f'image {i} ({OPS[ops[0, i]][0]}, {OPS[ops[1, i]][0]})'
    # per-sample choices: the images of one batch drew different operations
    pairs = {(int(a), int(b)) for a, b in ops.t()}
    assert len(pairs) > n // 2 and len({int(a) for a in ops[0]}) > 5


def test_one_image_repeated_gets_different_views():
    img = sample_images(4)[:1].expand(16, -1, -1, -1).contiguous()
    out = RandAugment(SIZE, 'cpu')(img, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 16


def loader(strong_view, seed=3, n=40, batch_size=16):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DeviceLoader(imgs, labels, DATASETS['cifar10'], batch_size, 'cpu', train=True, seed=seed,
                        strong_view=strong_view)


def test_the_loaders_generator_alone_decides_both_views_and_a_saved_state_replays_them():
    a, b = loader(True), loader(True)
    first = list(a)
    assert all(isinstance(x, TwoViewBatch) for x in first)
    for x, y in zip(first, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
        assert not torch.equal(x.img, x.strong)
    state = a.state_dict()   # as the checkpoint after an epoch holds it
    second = list(a)
    c = loader(True, seed=99)
    c.load_state_dict(state)
    for x, y in zip(second, c):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    # a different seed gives different views
    assert not torch.equal(first[0].strong, next(iter(loader(True, seed=4))).strong)


def test_a_one_view_loader_yields_plain_batches_and_draws_nothing_for_the_strong_view():
    one, two = loader(False), loader(True)
    batches = list(one)
    assert all(type(x) is Batch for x in batches)
    first = next(iter(two))
    # the first batch's order and weak crops come first from the generator: equal
    assert torch.equal(batches[0].idx, first.idx) and torch.equal(batches[0].img, first.img)
    # then the two-view loader drew the strong view, the one-view loader nothing
    assert not torch.equal(one.generator.get_state(), two.generator.get_state())
    reference = loader(False)
    for _ in reference:
        pass
    assert torch.equal(one.generator.get_state(), reference.generator.get_state())
    # evaluation loaders never build it
    test = DeviceLoader(torch.zeros(4, 3, SIZE, SIZE, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                        DATASETS['cifar10'], 2, 'cpu', train=False, strong_view=True)
    assert all(type(x) is Batch for x in test)


def test_drawn_operations_values_and_cutouts_follow_the_official_distribution():
    n = 14000
    policy = RandAugment(SIZE, 'cpu')
    ops, values, cutout = policy.draw(n, torch.Generator().manual_seed(0))
    # each of the 14 operations equally often, in each of the two slots
    for k in range(2):
        counts = torch.bincount(ops[k], minlength=len(OPS)).numpy()
        assert chi2(counts) < chi2_critical(len(OPS) - 1), counts
    # the two slots independent (with replacement): the same operation twice about 1/14 of the time
    same = float((ops[0] == ops[1]).double().mean())
    assert abs(same - 1 / 14) < 5 * math.sqrt(1 / 14 * 13 / 14 / n)
    # values uniform over each operation's range: mean in the middle, extremes reached
    for i, (name, low, high) in enumerate(OPS):
        v = values[ops == i]
        assert low <= v.min() and v.max() <= high, name
        spread = (high - low) / math.sqrt(12 * len(v))
        assert abs(float(v.mean()) - (low + high) / 2) < 5 * spread, name
        assert float(v.min()) < low + 0.01 * (high - low) and float(v.max()) > high - 0.01 * (high - low)
    # the Cutout's covered area, against the official formula drawn with numpy
    img = torch.zeros(2000, 3, SIZE, SIZE, dtype=torch.uint8)
    area = (policy.cutout(img, cutout[:, :2000])[:, 0] == CUTOUT_FILL[0]).double().sum((1, 2))
    rng = np.random.RandomState(0)   # the official calls: np.random.uniform(w), low w, high 1
    side = rng.random_sample(100000) * 0.5 * SIZE
    x0 = np.maximum(0, rng.uniform(SIZE, size=100000) - side / 2).astype(int)
    y0 = np.maximum(0, rng.uniform(SIZE, size=100000) - side / 2).astype(int)
    w = np.minimum(SIZE - 1, np.minimum(SIZE, x0 + side).astype(int)) - x0 + 1
    h = np.minimum(SIZE - 1, np.minimum(SIZE, y0 + side).astype(int)) - y0 + 1
    expected = (w * h).astype(float)
    assert abs(float(area.mean()) - expected.mean()) < 5 * expected.std() / math.sqrt(2000)


def test_the_strong_view_never_reads_a_value_back_to_the_host():
    from test_capture import SYNCING_OPS, OpRecorder
    two = loader(True)
    recorder = OpRecorder()
    with recorder:
        for _ in two:
            pass
    assert not recorder.ops & set(SYNCING_OPS), sorted(recorder.ops & set(SYNCING_OPS))
