"""The Pix2Pix networks: U-Net 256 generator and 70x70 PatchGAN discriminator.

The architecture follows the pix2pix reference (``networks.py``: ``UnetGenerator`` with
``num_downs=8`` and ``NLayerDiscriminator`` with ``n_layers=3``), written as an explicit
encoder/decoder instead of recursive blocks so the skip connections are easy to read.
Inference and training share this one definition.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

#: Channel multipliers of the eight encoder levels (times ``ngf``).
_ENCODER_MULT = (1, 2, 4, 8, 8, 8, 8, 8)
#: Decoder levels whose output gets dropout (the three ``ngf*8`` levels above the innermost).
_DROPOUT_LEVELS = frozenset({1, 2, 3})


class UNetGenerator(nn.Module):
    """U-Net 256: eight 4x4 stride-2 downsamplings to 1x1, eight upsamplings back, with skips.

    Encoder level i: LeakyReLU(0.2) -> Conv -> BatchNorm (the first level has neither the
    activation nor the norm, the innermost no norm). Decoder level: ReLU -> ConvTranspose ->
    BatchNorm (-> Dropout 0.5 in the three ngf*8 levels below the innermost), concatenated
    with the mirrored encoder output; the outermost ends in Tanh. Convolutions followed by
    BatchNorm carry no bias, as in the reference.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64) -> None:
        super().__init__()
        widths = [ngf * m for m in _ENCODER_MULT]
        self.encoder = nn.ModuleList()
        prev = in_channels
        for level, width in enumerate(widths):
            layers: list[nn.Module] = []
            if level > 0:
                layers.append(nn.LeakyReLU(0.2))
            layers.append(nn.Conv2d(prev, width, 4, 2, 1, bias=False))
            if 0 < level < len(widths) - 1:
                layers.append(nn.BatchNorm2d(width))
            self.encoder.append(nn.Sequential(*layers))
            prev = width

        self.decoder = nn.ModuleList()
        # Decoder level k (0 = innermost) outputs the width of encoder level 6 - k and takes the
        # previous decoder output concatenated with the skip of encoder level 7 - k.
        for k in range(len(widths)):
            in_width = widths[-1] if k == 0 else 2 * widths[len(widths) - 1 - k]
            outermost = k == len(widths) - 1
            if outermost:
                self.decoder.append(
                    nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(in_width, out_channels, 4, 2, 1), nn.Tanh())
                )
                continue
            out_width = widths[len(widths) - 2 - k]
            layers = [nn.ReLU(), nn.ConvTranspose2d(in_width, out_width, 4, 2, 1, bias=False),
                      nn.BatchNorm2d(out_width)]
            if k in _DROPOUT_LEVELS:
                layers.append(nn.Dropout(0.5))
            self.decoder.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()  # the innermost output feeds the decoder directly
        for k, block in enumerate(self.decoder):
            if k > 0:
                x = torch.cat([skips.pop(), x], dim=1)
            x = block(x)
        return x


class FlipAveraged(nn.Module):
    """Test-time augmentation: each image's output averaged with the mirrored output of its
    mirror image, in one batch (twice the compute).

    A GAN generator paints small, unsystematic texture and colour noise into flat map areas; the
    two passes disagree on it and agree on the map, so their mean is closer to the target (the
    default model's held-out figures with and without it are in docs/model_card.md). Inference
    only: in eval mode the two halves of the batch do not see each other (train-mode BatchNorm
    would couple them). The result is mirror-symmetric: a mirrored input gives the mirrored output.
    """

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = self.generator(torch.cat([x, x.flip(-1)]))
        return (y[:n] + y[n:].flip(-1)) * 0.5


def moved(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` (..., H, W) with its content moved ``dy`` pixels down and ``dx`` right, the edge it
    leaves filled with the content's mirror image: the same scene at another place on the U-Net's
    256-pixel grid, whose map differs (:class:`ViewMedian`'s views; ``train --shift``)."""
    if not (dy or dx):
        return img
    h, w = img.shape[-2:]
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    padded = F.pad(img.reshape(1, -1, h, w), pad, mode="reflect").reshape(*img.shape[:-2], h + abs(dy), w + abs(dx))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


class ViewMedian(nn.Module):
    """Test-time augmentation, stronger: the per-pixel median of 18 views, each image shifted by
    ``shift`` pixels on a 3 x 3 grid (reflected at its edges) and each shift mirrored too.

    The U-Net's eight stride-2 levels make its map of a scene depend on where the scene falls on
    its 256-pixel grid, and the shifted views disagree on the texture noise as the mirrored ones
    do. The median, not the mean, combines them because the generator is trained with an L1
    term, whose best answer is a median: the mean of views that disagree on a pixel's colour
    paints a blend no map has, so it gains RMSE but loses acc@5, where the median keeps one of
    the colours (the default model on the held-out pairs: see the model card). A pixel a shift
    moves out of view is left to the other views. Mirror-symmetric, like :class:`FlipAveraged`
    (the shifts are), and inference only: 18 passes (``translate --tta-median``; a teacher's maps,
    ``train --distill-views median``, are made once a run).
    """

    def __init__(self, generator: nn.Module, shift: int = 3) -> None:
        super().__init__()
        self.generator = generator
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return median_of_views(x, self.generator, self.shift)


#: The views :func:`median_of_views` takes: a 3 x 3 grid of shifts, each also mirrored.
MEDIAN_VIEWS = 18


def median_of_views(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], shift: int = 3) -> torch.Tensor:
    """:class:`ViewMedian`'s median of 18 views of the batch ``x`` (N, C, H, W), each view's map made
    by ``run``: the generator itself, or a translate engine on 0..255 pixels (any backend: the
    median of ordered values commutes with the engines' monotone scaling and clamping, so it is
    the same map). ``run`` is called on batches of N, the caller's own batch size, once a view."""
    h, w = x.shape[-2:]
    s = shift
    views = None  # the 18 maps moved back, filled in place (a stack of them would be a second copy)
    k = 0
    for dy in (-s, 0, s):
        for dx in (-s, 0, s):
            v = moved(x, -dy, -dx).contiguous()
            for out in (run(v).float(), run(v.flip(-1)).float().flip(-1)):  # out[i, j]: the map at (i + dy, j + dx)
                if views is None:
                    views = torch.full((MEDIAN_VIEWS, *out.shape), float("nan"), dtype=torch.float32, device=out.device)
                views[k, :, :, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                    out[:, :, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
                k += 1
    return views.nanmedian(dim=0).values


#: Test-time augmentations by name: translate/evaluate --tta ("flip") and --tta-median, and the
#: teacher's views in distillation (train --distill-views).
TTA = {"flip": FlipAveraged, "median": ViewMedian}
#: How maps and summaries name each.
TTA_LABELS = {"flip": "flip-averaged", "median": "median of 18 views"}


def tta_name(tta: bool | str | None) -> str | None:
    """The test-time augmentation asked for: a key of :data:`TTA`, or None; True is the flip
    average (``tta=True`` before the median was added); any other value is an :class:`InputError`."""
    name = ("flip" if tta else None) if isinstance(tta, bool) else tta
    if name is not None and name not in TTA:
        raise InputError(f"unknown test-time augmentation {tta!r} (use {' or '.join(TTA)})")
    return name


def recorded_tta(name: str | None) -> bool | str:
    """How maps, progress records and evaluate's JSON hold the test-time augmentation ``name``:
    false and true for none and the flip average, as they did before the median was added (so
    that their records still match), the name for the others."""
    return {None: False, "flip": True}.get(name, name)


def with_tta(net: nn.Module, tta: bool | str | None) -> nn.Module:
    """``net`` wrapped for the test-time augmentation ``tta`` (see :func:`tta_name`), once: a
    generator already wrapped so is returned as is."""
    name = tta_name(tta)
    if name is None or isinstance(net, TTA[name]):
        return net
    return TTA[name](net)


def tta_of(net: nn.Module) -> str | None:
    """The test-time augmentation ``net`` runs (a key of :data:`TTA`), None for a bare generator."""
    return next((name for name, cls in TTA.items() if isinstance(net, cls)), None)


class PixelScaled(nn.Module):
    """The generator with translate's value mapping inside: 0..255 pixels in, 0..255 map out (the
    graphs ONNX Runtime runs take and give pixels, so no pass over the tiles is left outside)."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.generator(x / 127.5 - 1.0).clamp(-1.0, 1.0) + 1.0) * 127.5


class SubPixelUp(nn.Module):
    """A ``ConvTranspose2d(4, stride 2, padding 1)`` and the eval-mode BatchNorm after it as one
    2x2 convolution with four times the output channels, a pixel shuffle and a one-pixel crop:
    the same map (to float rounding), in layers that int8 kernels exist for (ONNX Runtime has none
    for transposed convolutions, see :mod:`geosat2map.quantize`).

    Output pixel (2i + a, 2j + b) takes input rows (columns) {i - 1, i} with kernel taps (3, 1)
    where a (b) is 0, and {i, i + 1} with taps (2, 0) where it is 1. Padded by 1, the 2x2
    convolution gives (H + 1) x (W + 1) positions, each holding the four phases; shuffled, that is
    the output with one extra pixel on each side, hence the crop."""

    def __init__(self, up: nn.ConvTranspose2d, bn: nn.BatchNorm2d | None) -> None:
        super().__init__()
        w = up.weight.detach()  # (in, out, 4, 4)
        bias = up.bias.detach() if up.bias is not None else torch.zeros(w.shape[1])
        if bn is not None:
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            w = w * scale[None, :, None, None]
            bias = bn.bias.detach() + (bias - bn.running_mean) * scale
        taps = ((2, 0), (3, 1))  # by output phase: the taps for input offsets (0, +1) / (-1, 0)
        phases = [w[:, :, list(taps[a])][:, :, :, list(taps[b])].transpose(0, 1) for a in (0, 1) for b in (0, 1)]
        self.conv = nn.Conv2d(w.shape[0], 4 * w.shape[1], 2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack(phases, 1).flatten(0, 1))  # channel c * 4 + phase
            self.conv.bias.copy_(bias.repeat_interleave(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return nn.functional.pixel_shuffle(self.conv(x), 2)[:, :, 1 : 2 * h + 1, 1 : 2 * w + 1]


def subpixel_generator(net: nn.Module) -> nn.Module:
    """An fp32, eval-mode copy of ``net`` (a :class:`UNetGenerator`, or one inside
    :class:`FlipAveraged`) with every decoder level's transposed convolution and BatchNorm as a
    :class:`SubPixelUp`; dropout, eval-mode, is the identity either way."""
    if isinstance(net, FlipAveraged):
        return FlipAveraged(subpixel_generator(net.generator))
    g = copy.deepcopy(net).float().eval()
    for k, block in enumerate(g.decoder):
        layers, i = [], 0
        while i < len(block):
            if isinstance(block[i], nn.ConvTranspose2d):
                bn = block[i + 1] if i + 1 < len(block) and isinstance(block[i + 1], nn.BatchNorm2d) else None
                layers.append(SubPixelUp(block[i], bn))
                i += 2 if bn is not None else 1
            else:
                layers.append(block[i])
                i += 1
        g.decoder[k] = nn.Sequential(*layers)
    return g


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN: classifies overlapping 70x70 patches of (input, output) pairs as real/fake."""

    def __init__(self, in_channels: int = 6, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            nxt = ndf * min(2**n, 8)
            layers += [nn.Conv2d(width, nxt, 4, stride, 1, bias=False), nn.BatchNorm2d(nxt), nn.LeakyReLU(0.2)]
            width = nxt
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _grown_positions(image_in: int, image_out: int, old_ngf: int,
                     ngf: int) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """Where a width-``old_ngf`` generator's channels sit in the width-``ngf`` one grown from it:
    per block (``"encoder"`` or ``"decoder"``, index), the input and output channel positions."""
    levels = len(_ENCODER_MULT)

    def kept(level: int, blocks: int = 1) -> torch.Tensor:
        """Positions of encoder ``level``'s old channels among its new ones, in ``blocks``
        concatenated copies (a decoder input is the skip, then the level below: two)."""
        old, new = old_ngf * _ENCODER_MULT[level], ngf * _ENCODER_MULT[level]
        return torch.cat([torch.arange(old) + b * new for b in range(blocks)])

    for level in range(levels):  # in: the level above (the image for level 0)
        yield "encoder", level, torch.arange(image_in) if level == 0 else kept(level - 1), kept(level)
    for k in range(levels):  # in: [skip, decoder k - 1], both of encoder level 7 - k's width
        src = kept(levels - 1) if k == 0 else kept(levels - 1 - k, 2)
        yield "decoder", k, src, torch.arange(image_out) if k == levels - 1 else kept(levels - 2 - k)


def widen_generator(narrow: UNetGenerator, ngf: int) -> tuple[UNetGenerator, list[torch.Tensor]]:
    """A width-``ngf`` copy of ``narrow`` that computes exactly what it does (Net2Net-style growth).

    Every layer keeps the narrow one's channels and gains new ones, initialised as
    :func:`init_weights` does; the weights from new input channels into old output channels (and
    into the output image) are zero, so the new channels change nothing until training grows those
    weights, and then add capacity to a model that already works. Returns the generator and, per
    BatchNorm layer in module order, the indices of its new channels (whose running statistics
    are the caller's to estimate)."""
    old_ngf = narrow.encoder[0][0].out_channels
    if ngf < old_ngf:
        raise ValueError(f"cannot narrow a width-{old_ngf} generator to {ngf}")
    image_in, image_out = narrow.encoder[0][0].in_channels, narrow.decoder[-1][1].out_channels
    wide = UNetGenerator(image_in, image_out, ngf)
    init_weights(wide)
    new_channels = []
    with torch.no_grad():
        for part, i, src, dst in _grown_positions(image_in, image_out, old_ngf, ngf):
            new_channels += _copy_block(getattr(narrow, part)[i], getattr(wide, part)[i], src, dst,
                                        part == "decoder")
    return wide, new_channels


def narrow_generator(wide: UNetGenerator, ngf: int) -> UNetGenerator:
    """The width-``ngf`` generator that ``wide`` was grown from by :func:`widen_generator`, as
    ``wide`` has trained it: each layer's grown-from channels, the weights among them and their
    BatchNorm statistics; the rest dropped.

    A grown generator trained on does not need its new channels much: session 48's width-64 run,
    grown from the then shipped width-48 file and trained 21 epochs, scored 22.03 held-out RMSE
    narrowed back (the width-48 file 22.09, the width-64 one 21.99), before any fine-tuning; the
    default model is it narrowed and fine-tuned (sessions 49-50)."""
    old_ngf = wide.encoder[0][0].out_channels
    if ngf > old_ngf:
        raise ValueError(f"cannot narrow a width-{old_ngf} generator to {ngf}")
    image_in, image_out = wide.encoder[0][0].in_channels, wide.decoder[-1][1].out_channels
    narrow = UNetGenerator(image_in, image_out, ngf)
    with torch.no_grad():
        for part, i, src, dst in _grown_positions(image_in, image_out, ngf, old_ngf):
            wide_block, narrow_block = getattr(wide, part)[i], getattr(narrow, part)[i]
            (conv_w, weight), (conv_n, kept) = (_conv_out_in(block, part == "decoder")
                                                for block in (wide_block, narrow_block))
            kept.copy_(weight[dst[:, None], src])
            if conv_n.bias is not None:
                conv_n.bias.copy_(conv_w.bias[dst])
            for bn_w, bn_n in zip(wide_block, narrow_block):
                if isinstance(bn_w, nn.BatchNorm2d):
                    for name in _BATCHNORM_STATE:
                        getattr(bn_n, name).copy_(getattr(bn_w, name)[dst])
                    bn_n.num_batches_tracked.copy_(bn_w.num_batches_tracked)
    return narrow.train(wide.training)


#: A BatchNorm layer's per-channel parameters and running statistics.
_BATCHNORM_STATE = ("weight", "bias", "running_mean", "running_var")


def _conv_out_in(block: nn.Sequential, transposed: bool) -> tuple[nn.Module, torch.Tensor]:
    """A level's convolution and its weight as an (out, in, kh, kw) view (a ConvTranspose2d
    stores (in, out, kh, kw))."""
    conv = next(m for m in block if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    return conv, conv.weight.transpose(0, 1) if transposed else conv.weight


def _copy_block(narrow: nn.Sequential, wide: nn.Sequential, src: torch.Tensor, dst: torch.Tensor,
                transposed: bool) -> list[torch.Tensor]:
    """Copy one level's conv (and BatchNorm) into the wide level at input positions ``src`` and
    output positions ``dst``; zero the weights from the other inputs into ``dst``."""
    (conv_n, old), (conv_w, weight) = (_conv_out_in(block, transposed) for block in (narrow, wide))
    weight[dst] = 0.0
    weight[dst[:, None], src] = old
    if conv_n.bias is not None:
        conv_w.bias[dst] = conv_n.bias
    bns = [(a, b) for a, b in zip(narrow, wide) if isinstance(a, nn.BatchNorm2d)]
    for bn_n, bn_w in bns:
        for name in _BATCHNORM_STATE:
            getattr(bn_w, name)[dst] = getattr(bn_n, name)
        bn_w.num_batches_tracked.copy_(bn_n.num_batches_tracked)
    fresh = torch.ones(conv_w.out_channels, dtype=torch.bool)
    fresh[dst] = False
    return [fresh.nonzero().flatten() for _ in bns]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """The pix2pix 'normal' init: conv weights N(0, std), BatchNorm weights N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


@contextmanager
def modes_kept(module: nn.Module) -> Iterator[nn.Module]:
    """Switch ``module`` freely inside; every submodule gets its own train/eval mode back on exit.

    ``module.train(flag)`` sets all submodules alike, so restoring a model with it would undo
    BatchNorm layers held in eval mode inside a training generator (``train --freeze-batchnorm``)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
