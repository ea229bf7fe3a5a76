"""Float64 numpy building blocks for the loss tests' independent computations:
convolutions, BatchNorm and adaptive average pooling written out, so a test
can recompute a method's connectors and losses without torch's kernels."""
import numpy as np


def np_(t):
    """A tensor as a float64 numpy array."""
    return t.detach().double().numpy()


def conv1x1(conv, x):
    out = np.einsum('oc,bchw->bohw', np_(conv.weight)[:, :, 0, 0], x)
    return out if conv.bias is None else out + np_(conv.bias).reshape(1, -1, 1, 1)


def conv3x3(conv, x):
    """Stride 1, zero padding 1."""
    w, (h, wd) = np_(conv.weight), x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = sum(np.einsum('oc,bchw->bohw', w[:, :, i, j], xp[:, :, i:i + h, j:j + wd])
              for i in range(3) for j in range(3))
    return out if conv.bias is None else out + np_(conv.bias).reshape(1, -1, 1, 1)


def batchnorm(bn, x, eps=1e-5):
    """Train mode: the batch's statistics, biased variance."""
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np_(bn.weight).reshape(1, -1, 1, 1) \
        + np_(bn.bias).reshape(1, -1, 1, 1)


def avg_pool(x, size):
    """Adaptive average pooling to `size` (an int or (h, w)): each output cell
    averages the rows floor(i*H/n) to ceil((i+1)*H/n), as torch defines it."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    h, w = x.shape[2:]
    out = np.zeros(x.shape[:2] + size)
    for i in range(size[0]):
        for j in range(size[1]):
            r0, r1 = i * h // size[0], -(-(i + 1) * h // size[0])
            c0, c1 = j * w // size[1], -(-(j + 1) * w // size[1])
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out
