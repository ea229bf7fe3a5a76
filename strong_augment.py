"""The strong view: FixMatch-style RandAugment on a uint8 batch on the device.

Multi-Level Logit Distillation (kd_losses/mlkd.py) trains on a second,
strongly augmented view of every image. Its official code
(Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py:
the operations lines 144-269, `augment_list` 272-289, `RandAugment` 292-305,
`get_cifar100_train_transform_strong` 321-342) builds
it per image with PIL: a random crop and flip drawn independently of the weak
view's, then `RandAugment(2, 10)`:

- two operations drawn uniformly, with replacement, from the 14 below;
- each with a value drawn uniformly from the operation's own range (the
  magnitude 10 is unused there: "deprecated", its comment says);
- then a Cutout: a square of side u * 0.5 * 32 (u uniform), centred on a
  point whose coordinates are uniform on (1, 32] (the code calls
  `np.random.uniform(32)`, whose low is 32 and high 1), its corner truncated
  to an integer, filled with (125, 123, 114), both corners included as
  Pillow draws it (so at least one pixel).

| op | value range | what |
|---|---|---|
| AutoContrast | - | stretch each channel to 0..255 |
| Brightness, Color, Contrast, Sharpness | 0.05..0.95 | blend towards black, grey, the mean grey, a blur |
| Equalize | - | equalise each channel's histogram |
| Identity | - | nothing |
| Posterize | 4..8 | keep int(value) bits |
| Rotate | -30..30 | degrees, counter-clockwise, about the centre |
| ShearX, ShearY | -0.3..0.3 | (1, v, 0, 0, 1, 0) / (1, 0, 0, v, 1, 0) about the top-left corner |
| Solarize | 0..256 | invert pixels at or above the threshold |
| TranslateX, TranslateY | -0.3..0.3 | shift by value * 32 pixels (content moves left / up) |

Here every operation runs on the whole batch at once, with per-sample
choices and values: the geometric ones as one `grid_sample` over per-sample
affine matrices, the colour ones as batched tensor arithmetic, each result
kept where the sample drew that operation. Each operation computes what
torchvision's tensor implementation (torchvision.transforms.functional on a
uint8 image) computes for one image, whose semantics follow PIL's; pixels
leaving the image are filled with 0, as PIL does. All random draws come from
the generator passed in (the loader's own), on the device: no host sync,
reproducible, and restored exactly with the generator's state.

The crop and flip before it are the project's own (dataset.augment: reflect
padding; the official code pads with zeros), drawn apart from the weak
view's: both views are cropped the same way, each with its own offsets.
"""
import torch
import torch.nn.functional as F

__all__ = ['OPS', 'CUTOUT_FILL', 'RandAugment']

# (name, low, high) in the official `augment_list` order: a sample's drawn
# index i means OPS[i], with value low + (high - low) * u.
OPS = (('AutoContrast', 0.0, 1.0), ('Brightness', 0.05, 0.95), ('Color', 0.05, 0.95),
       ('Contrast', 0.05, 0.95), ('Equalize', 0.0, 1.0), ('Identity', 0.0, 1.0),
       ('Posterize', 4.0, 8.0), ('Rotate', -30.0, 30.0), ('Sharpness', 0.05, 0.95),
       ('ShearX', -0.3, 0.3), ('ShearY', -0.3, 0.3), ('Solarize', 0.0, 256.0),
       ('TranslateX', -0.3, 0.3), ('TranslateY', -0.3, 0.3))
OP_INDEX = {name: i for i, (name, _, _) in enumerate(OPS)}
N_OPS_PER_IMAGE = 2      # RandAugment(2, 10)
CUTOUT_MAX = 0.5         # Cutout side: up to half the image
CUTOUT_FILL = (125, 123, 114)
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
BLENDS = ('Brightness', 'Color', 'Contrast', 'Sharpness')


def _blend(img, degenerate, ratio):
    """torchvision's _blend on uint8: ratio * img + (1 - ratio) * degenerate,
    clamped, truncated to uint8. `ratio` is float64 [B]: each factor is
    rounded to float32 as torchvision rounds a Python float."""
    r = ratio.float().view(-1, 1, 1, 1)
    rc = (1.0 - ratio).float().view(-1, 1, 1, 1)
    return (r * img.float() + rc * degenerate).clamp(0, 255).to(torch.uint8)


def grayscale(img):
    """[B, 1, H, W] uint8 luma, as torchvision's rgb_to_grayscale (truncated)."""
    r, g, b = img.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).unsqueeze(1)


def blurred(img):
    """torchvision's sharpness degenerate: the 3x3 smoothing kernel (centre 5,
    others 1, over 13), rounded, inside a border of the original pixels."""
    kernel = torch.ones((3, 3), dtype=torch.float32, device=img.device)
    kernel[1, 1] = 5.0
    kernel /= kernel.sum()
    c = img.shape[1]
    inner = F.conv2d(img.float(), kernel.expand(c, 1, 3, 3), groups=c).round_().to(torch.uint8)
    out = img.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def autocontrast(img):
    """torchvision's autocontrast: each channel's range stretched to 0..255 (a
    flat channel unchanged), truncated."""
    lo = img.amin(dim=(-2, -1), keepdim=True).float()
    hi = img.amax(dim=(-2, -1), keepdim=True).float()
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), 255.0 / (hi - lo))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((img - lo) * scale).clamp(0, 255).to(torch.uint8)


def equalize(img):
    """torchvision's equalize, every channel of every image at once: the
    cumulative histogram's lookup table, with step (pixels not at the
    channel's highest value) // 255; a channel whose step is 0 unchanged."""
    b, c, h, w = img.shape
    flat = img.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=img.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    at_max = hist.gather(1, flat.amax(dim=1, keepdim=True))   # the last non-empty bin
    step = torch.div(h * w - at_max, 255, rounding_mode='floor')
    safe = step.clamp(min=1)
    lut = torch.div(hist.cumsum(1) + torch.div(safe, 2, rounding_mode='floor'), safe,
                    rounding_mode='floor')
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.to(torch.uint8).view(b, c, h, w)


def posterize(img, value):
    """Keep the int(value) high bits (at least 1), as PIL and torchvision."""
    bits = value.floor().clamp(min=1, max=8).long()
    mask = (255 << (8 - bits)) & 255
    return img & mask.to(torch.uint8).view(-1, 1, 1, 1)


def solarize(img, value):
    """Invert the pixels at or above the threshold (compared in float32, as
    torchvision compares a uint8 image with a Python float)."""
    return torch.where(img.float() >= value.float().view(-1, 1, 1, 1), 255 - img, img)


def inverse_affine(angle, shear_x, shear_y, tx, ty, cx, cy):
    """[B, 2, 3] float64: torchvision's _get_inverse_affine_matrix (scale 1) for
    per-sample angles and shears in degrees, translations and centres
    (relative to the image centre), the output-to-input map."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([torch.stack([m0, m1, m2], 1), torch.stack([m3, m4, m5], 1)], 1)


class RandAugment:
    """The official policy for images of one size on one device: `draw` the
    per-sample choices from a generator, `apply` them to a uint8 batch.
    The affine base grid is built once here, not per batch."""

    def __init__(self, size, device):
        self.size, self.device = size, torch.device(device)
        # torchvision's _gen_affine_grid base: pixel centres relative to the image centre
        half = size * 0.5
        coords = torch.linspace(-half + 0.5, half - 0.5, steps=size, device=self.device)
        base = torch.empty(size, size, 3, device=self.device)
        base[..., 0].copy_(coords)
        base[..., 1].copy_(coords.unsqueeze(-1))
        base[..., 2].fill_(1)
        self.base_grid = base.view(1, size * size, 3)
        self.grid_scale = torch.tensor([half, half], device=self.device)
        self.fill = torch.tensor(CUTOUT_FILL, dtype=torch.uint8, device=self.device).view(1, 3, 1, 1)
        self.pixels = torch.arange(size, device=self.device)
        self.lows = torch.tensor([low for _, low, _ in OPS], dtype=torch.float64, device=self.device)
        self.spans = torch.tensor([high - low for _, low, high in OPS], dtype=torch.float64,
                                  device=self.device)

    def draw(self, n, generator):
        """(ops [2, n] int64, values [2, n] float64, cutout [3, n] float64 uniforms:
        side, centre x, centre y), drawn in that order from `generator`."""
        ops = torch.randint(0, len(OPS), (N_OPS_PER_IMAGE, n), device=self.device, generator=generator)
        u = torch.rand((N_OPS_PER_IMAGE, n), dtype=torch.float64, device=self.device, generator=generator)
        cutout = torch.rand((3, n), dtype=torch.float64, device=self.device, generator=generator)
        return ops, self.lows[ops] + self.spans[ops] * u, cutout

    def __call__(self, images, generator):
        """The policy on a uint8 batch [B, 3, H, W]: two operations, then Cutout."""
        ops, values, cutout = self.draw(images.shape[0], generator)
        for k in range(N_OPS_PER_IMAGE):
            images = self.apply_op(images, ops[k], values[k])
        return self.cutout(images, cutout)

    def apply_op(self, img, op, value):
        """Each sample i through operation OPS[op[i]] with value[i] (float64)."""
        out = img
        per_sample = op.view(-1, 1, 1, 1)

        def keep(name, result):
            return torch.where(per_sample == OP_INDEX[name], result, out)

        out = keep('AutoContrast', autocontrast(img))
        out = keep('Equalize', equalize(img))
        out = keep('Posterize', posterize(img, value))
        out = keep('Solarize', solarize(img, value))
        # the four blends: one blend towards each sample's own degenerate image
        blend = torch.zeros_like(per_sample, dtype=torch.bool)
        for name in BLENDS:
            blend = blend | (per_sample == OP_INDEX[name])
        degenerate = torch.zeros_like(img, dtype=torch.float32)           # Brightness: black
        gray = grayscale(img)
        degenerate = torch.where(per_sample == OP_INDEX['Color'], gray.float(), degenerate)
        mean = gray.float().mean(dim=(-3, -2, -1), keepdim=True)
        degenerate = torch.where(per_sample == OP_INDEX['Contrast'], mean, degenerate)
        degenerate = torch.where(per_sample == OP_INDEX['Sharpness'], blurred(img).float(), degenerate)
        out = torch.where(blend, _blend(img, degenerate, value), out)
        geometric = torch.zeros_like(per_sample, dtype=torch.bool)
        for name in GEOMETRIC:
            geometric = geometric | (per_sample == OP_INDEX[name])
        return torch.where(geometric, self.warp(img, op, value), out)

    def warp(self, img, op, value):
        """Every sample through its geometric operation's affine map (the
        identity for the others), nearest pixel, zeros outside: what
        torchvision's rotate / affine compute image by image."""
        zero = torch.zeros_like(value)

        def where(name, v):
            return torch.where(op == OP_INDEX[name], v, zero)

        # rotate passes -angle about the centre; the shears are about the
        # top-left corner (centre -size/2 relative to the image centre), with
        # the shear angle atan(value) in degrees, as torchvision's RandAugment;
        # a translation moves the content by -value * size (PIL's sign)
        shear = (op == OP_INDEX['ShearX']) | (op == OP_INDEX['ShearY'])
        corner = torch.where(shear, torch.full_like(value, -0.5 * self.size), zero)
        matrix = inverse_affine(where('Rotate', -value),
                                where('ShearX', torch.rad2deg(torch.atan(value))),
                                where('ShearY', torch.rad2deg(torch.atan(value))),
                                where('TranslateX', -value * self.size),
                                where('TranslateY', -value * self.size), corner, corner)
        theta = matrix.float().transpose(1, 2) / self.grid_scale
        grid = self.base_grid.expand(img.shape[0], -1, -1).bmm(theta)
        grid = grid.view(img.shape[0], self.size, self.size, 2)
        warped = F.grid_sample(img.float(), grid, mode='nearest', padding_mode='zeros',
                               align_corners=False)
        return warped.round_().to(torch.uint8)

    def cutout(self, img, uniforms):
        """The official Cutout from three uniforms per sample (side, centre x,
        centre y), as Pillow draws its rectangle: both corners included."""
        side = uniforms[0] * CUTOUT_MAX * self.size
        centre = self.size - (self.size - 1) * uniforms[1:]     # np.random.uniform(32): on (1, 32]
        start = (centre - side / 2).clamp(min=0).floor()
        end = torch.minimum(start + side, torch.full_like(start, float(self.size))).floor()
        inside = (self.pixels >= start[..., None]) & (self.pixels <= end[..., None])  # [2, B, size]
        box = inside[1][:, None, :, None] & inside[0][:, None, None, :]          # rows y, columns x
        return torch.where(box, self.fill, img)

