"""Image-translation metrics as the maps literature computes them.

All functions take uint8-range images as float tensors shaped ``(3, H, W)`` (values 0..255).
RMSE and accuracy follow the aerial->map protocol (e.g. GcGAN, SelectionGAN): both images at
256 x 256, ``RMSE = sqrt(sum over channels and pixels of squared difference / (H*W))`` and
``acc@delta`` = share of pixels whose largest channel difference is below ``delta``.
"""

from __future__ import annotations

import math

import torch


def rmse(output: torch.Tensor, target: torch.Tensor) -> float:
    diff = output.double() - target.double()
    return math.sqrt(float((diff**2).sum()) / (diff.shape[-1] * diff.shape[-2]))


def accuracy(output: torch.Tensor, target: torch.Tensor, delta: float) -> float:
    worst = (output.double() - target.double()).abs().amax(dim=0)
    return float((worst < delta).double().mean())


def psnr(output: torch.Tensor, target: torch.Tensor) -> float:
    mse = float(((output.double() - target.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(output: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03), averaged over channels.

    The Gaussian window is applied as two 1-D passes over the five local moments at once, each a
    weighted sum of shifted slices (:func:`_blur`): the same sums as the 11x11 window, in float64.
    """
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = output.double(), target.double()
    mu_x, mu_y, xx, yy, xy = _blur(torch.stack([x, y, x * x, y * y, x * y]), _gaussian_1d())
    sxx, syy, sxy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def _blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``images`` (..., H, W) filtered by the separable window ``kernel`` x ``kernel``, valid part only.

    Eleven shifted multiply-adds per axis: on the CPU, 10x faster than float64 ``conv2d`` (which
    has no fast kernel for doubles: 84 against 8 ms per 256 x 256 pair, most of `evaluate`'s time
    beside the model), with the same result on the test images.
    """
    n = kernel.numel()
    rows = images.shape[-1] - n + 1
    out = images[..., :rows] * float(kernel[0])
    for k in range(1, n):
        out.add_(images[..., k:k + rows], alpha=float(kernel[k]))
    cols = out.shape[-2] - n + 1
    blurred = out[..., :cols, :] * float(kernel[0])
    for k in range(1, n):
        blurred.add_(out[..., k:k + cols, :], alpha=float(kernel[k]))
    return blurred


def image_metrics(output: torch.Tensor, target: torch.Tensor, classes: bool = False) -> dict[str, float]:
    """All per-image metrics for one (output, target) pair; with ``classes``, :func:`class_counts` too."""
    return {
        "rmse": rmse(output, target),
        "acc5": accuracy(output, target, 5),
        "acc10": accuracy(output, target, 10),
        "psnr": psnr(output, target),
        "ssim": ssim(output, target),
    } | (class_counts(output, target) if classes else {})


#: The maps' colour classes, each by its most frequent colour in the maps training targets (the
#: pix2pix maps set: Google Maps of New York): what a map reader tells apart.
MAP_CLASSES = {"land": (233, 228, 222), "building": (243, 240, 233), "road": (255, 255, 255),
               "highway": (252, 158, 38), "water": (177, 208, 254), "park": (203, 223, 172)}
#: The farthest (RGB distance) a pixel may lie from its class's colour: 93 % of the held-out targets'
#: pixels lie within it of one; the rest (labels, icons, edges between colours) are in no class.
CLASS_TOLERANCE = 20.0
CLASS_KEY = "class:"


def colour_classes(image: torch.Tensor) -> torch.Tensor:
    """Each pixel's class (an index into :data:`MAP_CLASSES`), ``len(MAP_CLASSES)`` for none."""
    palette = torch.tensor(list(MAP_CLASSES.values()), dtype=torch.float32)
    distance = torch.cdist(image.float().flatten(1).T, palette)  # (pixels, classes)
    nearest, index = distance.min(dim=1)
    index[nearest > CLASS_TOLERANCE] = len(MAP_CLASSES)
    return index.reshape(image.shape[-2:])


def class_counts(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Per class, the shares of the image's pixels that both maps, only the output or only the
    target paint in it (true positives, false positives, false negatives)."""
    made, real = colour_classes(output), colour_classes(target)
    n = real.numel()
    counts = {}
    for k, name in enumerate(MAP_CLASSES):
        a, b = made == k, real == k
        for part, pixels in (("tp", a & b), ("fp", a & ~b), ("fn", ~a & b)):
            counts[f"{CLASS_KEY}{name}:{part}"] = float(pixels.sum()) / n
    return counts


def class_scores(per_image: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per class, pooled over the images: its share of the real maps' pixels, and the generated
    maps' precision, recall and intersection over union in it (NaN where it never occurs)."""
    def mean(key: str) -> float:
        return sum(m[key] for m in per_image) / len(per_image)

    scores = {}
    for name in MAP_CLASSES:
        tp, fp, fn = (mean(f"{CLASS_KEY}{name}:{k}") for k in ("tp", "fp", "fn"))
        scores[name] = {"share": tp + fn, "precision": tp / (tp + fp) if tp + fp else math.nan,
                        "recall": tp / (tp + fn) if tp + fn else math.nan,
                        "iou": tp / (tp + fp + fn) if tp + fp + fn else math.nan}
    return scores


def without_classes(per_image: list[dict[str, float]]) -> list[dict[str, float]]:
    """The per-image metrics without :func:`class_counts`' entries."""
    return [{k: v for k, v in m.items() if not k.startswith(CLASS_KEY)} for m in per_image]


def summarize(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over images (PSNR of identical pairs, infinite, is left out of its mean)."""
    if not per_image:
        return {}
    out: dict[str, float] = {"count": float(len(per_image))}
    for key in per_image[0]:
        vals = [m[key] for m in per_image if math.isfinite(m[key])]
        out[key] = sum(vals) / len(vals) if vals else math.inf
    return out


#: Metrics where a lower value is the better one (the rest: higher is better).
LOWER_IS_BETTER = frozenset({"rmse"})


def paired_differences(first: list[dict[str, float]], second: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric, the mean of ``first - second`` over the same images, its standard error and on how
    many images ``first`` is the better.

    Two good generators' means over about a hundred pairs differ by as little as noise moves them
    (see the model card), so a difference needs its standard error; pairing each image with itself
    removes the images' own spread from it. Pairs where either PSNR is infinite are left out of PSNR.
    """
    if len(first) != len(second):
        raise ValueError(f"{len(first)} against {len(second)} images: not the same pairs")
    out: dict[str, dict[str, float]] = {}
    for key in first[0] if first else ():
        diffs = [a[key] - b[key] for a, b in zip(first, second) if math.isfinite(a[key]) and math.isfinite(b[key])]
        mean, se = _mean_and_se(diffs)
        better = sum(1 for d in diffs if (d < 0 if key in LOWER_IS_BETTER else d > 0))
        out[key] = {"mean": mean, "se": se, "better": float(better), "count": float(len(diffs))}
    return out


def standard_errors(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the standard error of :func:`summarize`'s mean over the images: how far another
    draw of as many images of the same kind could move it (1.2 of RMSE over the 110 held-out
    maps pairs, far more than two good generators differ by; compare them with
    :func:`paired_differences`)."""
    return {key: _mean_and_se([m[key] for m in per_image if math.isfinite(m[key])])[1]
            for key in (per_image[0] if per_image else ())}


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n if n else math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
