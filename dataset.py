"""CIFAR-10/100 from the standard python layout, held on the training device.

The whole split lives as one uint8 tensor on the device. Each training batch
is cropped (reflect-pad 4, random 32x32), flipped and normalised in a single
batched gather: no PIL, no loader worker processes. Every batch carries the
samples' dataset indices (CRD needs them). A loader asked for the strong view
(modes whose views are ('weak', 'strong'), e.g. MLKD) also yields each
image's RandAugment view (strong_augment.py), drawn from the same generator.
"""
import hashlib
import os
import pickle
from dataclasses import dataclass
from typing import NamedTuple, Tuple

import numpy as np
import torch

from distributed import WORLD
from errors import UserError


@dataclass(frozen=True)
class CifarInfo:
    name: str
    num_class: int
    folder: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    label_key: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    torchvision_class: str


DATASETS = {
    'cifar10': CifarInfo('cifar10', 10, 'cifar-10-batches-py',
                         tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',),
                         'labels', (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 'CIFAR10'),
    'cifar100': CifarInfo('cifar100', 100, 'cifar-100-python', ('train',), ('test',),
                          'fine_labels', (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 'CIFAR100'),
}


class DataError(UserError):
    """The dataset is missing, cannot be fetched, or is malformed; the message says what to do."""


# What a CIFAR batch file may hold: dicts, lists, strings and bytes (no
# lookup needed) and numpy arrays, dtypes and scalars. Anything else in a
# pickle (a `__reduce__` payload calling os.system, say) is refused unread.
_ALLOWED_GLOBALS = {(module, name)
                    for package in ('numpy.core', 'numpy._core')
                    for module, name in ((f'{package}.multiarray', '_reconstruct'),
                                         (f'{package}.multiarray', 'scalar'),
                                         (f'{package}.numeric', '_frombuffer'))} | {
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
    ('__builtin__', 'bytes'), ('builtins', 'bytes')}  # protocol 2 writes b'' as bytes()


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f'it refers to {module}.{name}, which a CIFAR batch '
                                         f'does not hold (refused: it could run code)')
        return super().find_class(module, name)


def _read_batch(path, label_key, num_class):
    """One pickled batch -> (uint8 [n, 3, 32, 32], int64 [n]), checked for structure."""
    try:
        with open(path, 'rb') as f:
            entry = _CifarUnpickler(f, encoding='latin1').load()
    except Exception as e:  # truncated, not a pickle, wrong protocol, a refused object...
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot be read as a CIFAR batch ({detail})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a dict, found {type(entry).__name__}")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if 'data' not in entry or label_key not in entry:
        raise DataError(f"{path}: missing key 'data' or {label_key!r} (has {sorted(map(str, entry))})")
    data, labels = entry['data'], entry[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be a uint8 array, found "
                        f"{getattr(data, 'dtype', type(data).__name__)}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must have shape (n, 3072), found {data.shape}")
    if data.shape[0] == 0:
        raise DataError(f"{path}: holds no images")
    labels = np.asarray(labels)
    if labels.dtype.kind not in 'iu':  # 1.7 would be truncated to 1 silently
        raise DataError(f"{path}: {label_key!r} must be integers, found "
                        f"{labels.dtype if labels.dtype.kind != 'O' else 'other values'}")
    labels = labels.astype(np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_class):
        raise DataError(f"{path}: labels must lie in [0, {num_class}), found "
                        f"[{labels.min()}, {labels.max()}]")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def _read_split(folder, files, info):
    parts = [_read_batch(os.path.join(folder, f), info.label_key, info.num_class) for f in files]
    images = torch.cat([p[0] for p in parts])
    if images.shape[0] == 0:
        raise DataError(f"{folder}: the split in {', '.join(files)} holds no images")
    return images, torch.cat([p[1] for p in parts])


def _missing_message(info, root, missing, reason):
    """Why the dataset cannot be read and how to get it, in one line."""
    return (f"{info.name} not found: {os.path.join(root, info.folder)}/ lacks "
            f"{', '.join(missing)}. {reason} Get it by running once with network access "
            f"(downloading is on unless --no_download), or unpack the official python archive "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) so that {info.folder}/ sits in "
            f"--img_root.")


def _dataset_folder_given(info, root):
    """A message when `root` is a dataset's own folder (e.g. .../cifar-10-batches-py)
    rather than the folder holding it, else None."""
    own = os.path.basename(os.path.normpath(root))
    holds_files = all(os.path.isfile(os.path.join(root, f)) for f in info.train_files + info.test_files)
    if own not in {d.folder for d in DATASETS.values()} and not holds_files:
        return None
    parent = os.path.dirname(os.path.normpath(os.path.abspath(root)))
    return (f"--img_root {root} is the dataset folder itself: give the folder that holds "
            f"{info.folder}/, its parent (--img_root {parent})")


def _download(info, root):
    """Fetch through torchvision's downloader, which verifies the archive's md5.
    A failed download leaves no empty folder behind."""
    import torchvision
    created = not os.path.exists(root)
    try:
        getattr(torchvision.datasets, info.torchvision_class)(root, train=True, download=True)
    except Exception as e:
        if created and os.path.isdir(root) and not any(os.scandir(root)):
            os.rmdir(root)
        missing = [f for f in info.train_files + info.test_files
                   if not os.path.isfile(os.path.join(root, info.folder, f))]
        detail = type(e).__name__ + (f": {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else '')
        raise DataError(_missing_message(info, root, missing, f"Downloading it failed ({detail}).")) from None


def load_cifar(root, name, download=True, log=print):
    """Read a CIFAR dataset directly from its pickles (no md5 gate, so re-packed
    copies load). Returns (train_images, train_labels, test_images, test_labels)
    as CPU tensors: uint8 [n, 3, 32, 32] and int64 [n]."""
    info = DATASETS[name]
    folder = os.path.join(root, info.folder)
    files = info.train_files + info.test_files
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        wrong_root = _dataset_folder_given(info, root)
        if wrong_root:  # checked before a download, which would nest a second copy inside
            raise DataError(wrong_root)
        if not download:
            raise DataError(_missing_message(info, root, missing, "Downloading is off (--no_download)."))
        log(f"{info.name} not found under {root}: downloading it with torchvision")
        _download(info, root)
    train = _read_split(folder, info.train_files, info)
    test = _read_split(folder, info.test_files, info)
    log(f"{info.name}: {len(train[0])} training and {len(test[0])} test images from {folder}")
    return (*train, *test)


class Batch(NamedTuple):
    img: torch.Tensor     # float [B, 3, 32, 32], normalised
    target: torch.Tensor  # int64 [B]
    idx: torch.Tensor     # int64 [B], indices into the training split


class TwoViewBatch(NamedTuple):
    """A Batch with the strong view: only a loader built with strong_view=True
    yields it, so code unpacking a three-field Batch never meets it."""
    img: torch.Tensor     # float [B, 3, 32, 32], normalised: the weak view (crop and flip)
    target: torch.Tensor  # int64 [B]
    idx: torch.Tensor     # int64 [B]
    strong: torch.Tensor  # float [B, 3, 32, 32], normalised: crop, flip, RandAugment, Cutout


def reflect_index(pos, size=32):
    """Map positions in [-size, 2*size-1) to the source index of a reflect padding."""
    return (size - 1) - ((size - 1) - pos.abs()).abs()


def crop_grid(batch, channels, size, device):
    """Index tensors of a batched gather: sample, channel and pixel positions."""
    return (torch.arange(batch, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            torch.arange(size, device=device))


def augment(images, rng_generator, pad=4, grid=None):
    """Random reflect-pad crop and horizontal flip of a uint8 batch, as one gather.

    The padded image is never built: each output pixel reads its source
    through reflected row and column indices; flipping reverses the columns.
    `grid` (from crop_grid) can be passed in to avoid rebuilding it per batch."""
    b, c, h, w = images.shape
    dev = images.device
    bi, ci, ar = grid if grid is not None else crop_grid(b, c, h, dev)
    shifts = torch.randint(0, 2 * pad + 1, (2, b), device=dev, generator=rng_generator)
    flips = torch.randint(0, 2, (b,), device=dev, generator=rng_generator).bool()
    rows = reflect_index(shifts[0, :, None] - pad + ar, h)                      # [B, H]
    cols = reflect_index(shifts[1, :, None] - pad + torch.where(flips[:, None], (w - 1) - ar, ar), w)
    return images[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """Batches of a split held on the device.

    Training: a fresh permutation per epoch (from this loader's own generator,
    so a checkpoint can restore it), augmented batches; the last partial batch
    is kept, as in the seed. Evaluation: the split in order, large batches.

    Under torchrun (`world` > 1) `batch_size` is the global batch: every rank
    draws the same permutation and augmentation for the whole global batch, as
    one process would, and takes its equal slice. A partial last training
    batch is cut to a multiple of `world` (at most world - 1 samples an epoch
    skip a step, different ones each epoch); evaluation slices are uneven
    instead, so every test image counts once.

    With `strong_view` (training only) each batch is a TwoViewBatch: after the
    weak view's crop and flip, the strong view's own crop, flip and
    RandAugment choices are drawn from the same generator (on the device), so
    a restored generator state gives both views again exactly. Without it
    nothing of the strong view is drawn or computed.
    """

    def __init__(self, images, labels, info, batch_size, device, train, seed=0,
                 rank=0, world=1, channels_last=False, strong_view=False):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.device = torch.device(device)
        self.train, self.batch_size = train, batch_size
        self.rank, self.world = rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        scale = 1.0 / (255.0 * torch.tensor(info.std))
        self.scale = scale.view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(info.mean) * 255.0 * scale).view(1, 3, 1, 1).to(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._grids = {}
        self.randaugment = None
        if strong_view and train:
            from strong_augment import RandAugment
            self.randaugment = RandAugment(images.shape[-1], self.device)

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def normalise(self, x_uint8):
        x = torch.addcmul(self.shift, x_uint8.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, device=self.device, generator=self.generator) if self.train
                 else torch.arange(n, device=self.device))
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.train and self.world > 1:
                idx = idx[:len(idx) - len(idx) % self.world]
                if len(idx) == 0:
                    continue
            raw = self.images[idx]
            x = raw
            if self.train:  # the global batch, so ranks see what one process would
                x = augment(raw, self.generator, grid=self.grid(len(idx)))
            strong = None
            if self.randaugment is not None:
                strong = augment(raw, self.generator, grid=self.grid(len(idx)))
                strong = self.randaugment(strong, self.generator)
            if self.world > 1:
                per = -(-len(idx) // self.world)
                rows = slice(self.rank * per, (self.rank + 1) * per)
                idx, x = idx[rows], x[rows]
                strong = None if strong is None else strong[rows]
            if strong is None:
                yield Batch(self.normalise(x), self.labels[idx], idx)
            else:
                yield TwoViewBatch(self.normalise(x), self.labels[idx], idx, self.normalise(strong))

    def grid(self, batch):
        """The gather's index tensors for a batch size, built once (full and last batch)."""
        if batch not in self._grids:
            self._grids[batch] = crop_grid(batch, self.images.shape[1], self.images.shape[2],
                                           self.device)
        return self._grids[batch]

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])


def make_loaders(args, device, log=print, training=True, strong_view=False):
    """Train and test loaders for `args.data_name` under `args.img_root`, on
    `device`, for this process's place in a torchrun job. With training=False
    only the test loader is built (train is None); with strong_view the
    training batches carry the strong view too (TwoViewBatch)."""
    rank, world = WORLD.rank, WORLD.size
    info = DATASETS[args.data_name]
    train_x, train_y, test_x, test_y = load_cifar(args.img_root, args.data_name,
                                                  download=not args.no_download, log=log)
    layout = getattr(args, 'channels_last', False)
    test = DeviceLoader(test_x, test_y, info, args.eval_batch_size, device, train=False,
                        rank=rank, world=world, channels_last=layout)
    if not training:
        return None, test
    if world > 1 and args.batch_size % world:
        raise DataError(f'--batch_size {args.batch_size} (the global batch) must be divisible by '
                        f'the {world} processes')
    if args.batch_size > len(train_y):
        raise DataError(f'--batch_size {args.batch_size} is larger than the training split '
                        f'({len(train_y)} images)')
    train = DeviceLoader(train_x, train_y, info, args.batch_size, device, train=True,
                         seed=args.seed, rank=rank, world=world, channels_last=layout,
                         strong_view=strong_view)
    train.fingerprint = fingerprint(train_x, train_y, test_x, test_y)
    return train, test


def fingerprint(*tensors):
    """What a resumed run checks its data against: sizes and a sha256 of the content."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return {'sizes': [len(t) for t in tensors[::2]], 'sha256': h.hexdigest()}


def main(argv=None):
    """`python dataset.py ROOT NAME...`: check (and, unless --no_download, fetch)
    datasets once, e.g. before a sweep starts many runs that read them."""
    from errors import ArgumentParser, cli
    parser = ArgumentParser(description=main.__doc__)
    parser.add_argument('img_root')
    parser.add_argument('names', nargs='+', choices=sorted(DATASETS))
    parser.add_argument('--no_download', action='store_true')

    @cli
    def run(argv):
        args = parser.parse_args(argv)
        for name in args.names:
            load_cifar(args.img_root, name, download=not args.no_download)
    run(argv)


if __name__ == '__main__':
    main()
