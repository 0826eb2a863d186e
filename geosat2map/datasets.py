"""Paired training data: pix2pix aligned folders and the tile folders ``geosat2map tiles`` writes.

Both become a :class:`PairDataset` of (input, target) uint8 tensors resized once to the load
size and kept in memory (1096 maps pairs at 286 px are about 540 MB), so each training step
only crops and flips; a set too large for that (:data:`IN_MEMORY_BYTES`: some 8 000 pairs, the
tiles of a county) is read from disk pair by pair instead, the same tensors. Augmentation is a
function of (seed, epoch, index), which makes a resumed run draw exactly what an uninterrupted
one would.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from .errors import DataError, first_line, gdal_reason
from .model import moved
from .reader import PNG_READ_OPTIONS
from .recolour import SHIFTS, Recolouring
from .records import fits

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
#: The most a data set's resized pairs may take in memory; a larger one is read pair by pair.
IN_MEMORY_BYTES = 4 * 2**30


@contextmanager
def _image(path: Path) -> Iterator[rasterio.io.DatasetReader]:
    """``path`` open, an 8-bit image, or a :class:`DataError` (for the open or any read in the block)."""
    try:
        with warnings.catch_warnings(), rasterio.Env(**PNG_READ_OPTIONS):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if src.dtypes[0] != "uint8":
                    raise DataError(f"{path}: expected 8-bit images, found {src.dtypes[0]}")
                yield src
    except RasterioIOError as exc:
        raise DataError(f"cannot read image {path}: {gdal_reason(exc)}") from None


def read_image(path: Path) -> np.ndarray:
    """An image file's first three bands as uint8 (3, H, W); one band is repeated to three."""
    with _image(path) as src:
        return src.read([1, 2, 3] if src.count >= 3 else [1, 1, 1])


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def list_images(folder: Path, allow_empty: bool = False) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files and not allow_empty:
        raise DataError(f"no images in {folder}")
    return files


def holdout_split(files: list[Path], every: int, split: str) -> list[Path]:
    """Every ``every``-th file (in natural order) is validation; ``every=0`` keeps all as train."""
    if split == "all" or every <= 0:
        return list(files) if split != "val" else []
    val = split == "val"
    return [f for i, f in enumerate(files) if (i % every == 0) == val]


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased resize of a uint8 (3, H, W) tensor to (3, size, size)."""
    if img.shape[-2:] == (size, size):
        return img
    out = F.interpolate(img[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def largest_shift(crop_size: int) -> int:
    """The most pixels a pair may be moved each way (``shift``): under half the crop, which the
    mirrored edge (a reflection) needs."""
    return crop_size // 2 - 1


class PairDataset(torch.utils.data.Dataset):
    """(input, target) pairs resized to ``load_size``; ``crop_size`` random crops with flips when
    ``augment``, random quarter turns too with ``rot90``, and random moves by up to ``shift``
    pixels each way (:func:`~geosat2map.model.moved`). With ``colour_jitter``, :meth:`recoloured`
    changes the inputs' colours (:mod:`~geosat2map.recolour`); the trainer calls it after the
    teacher has seen the pair as it is.

    ``pairs``: (input, target) uint8 arrays, or sources that read them (:class:`AlignedPair`,
    :class:`TilePair`); kept resized in memory when they fit in ``in_memory_bytes``, else read
    again at each use."""

    def __init__(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray] | Callable[[], tuple[np.ndarray, np.ndarray]]],
        names: list[str],
        load_size: int = 286,
        crop_size: int = 256,
        augment: bool = True,
        seed: int = 0,
        rot90: bool = False,
        shift: int = 0,
        in_memory_bytes: int = IN_MEMORY_BYTES,
        colour_jitter: float = 0.0,
    ) -> None:
        if not pairs:
            raise DataError("the data set is empty")
        if crop_size > load_size:
            raise DataError(f"crop size {crop_size} exceeds load size {load_size}")
        if not 0 <= shift <= largest_shift(crop_size):
            raise DataError(f"the shift must be from 0 to {largest_shift(crop_size)} pixels, not {shift}")
        self.size = load_size if augment else crop_size
        self.sources = list(pairs)
        self.kept = None
        if len(pairs) * 2 * 3 * self.size**2 <= in_memory_bytes:
            self.kept = [self._read(i) for i in range(len(pairs))]
            self.sources = []  # the arrays read are not held twice
        self.count = len(pairs)
        self.names = names
        self.load_size, self.crop_size, self.augment, self.seed = load_size, crop_size, augment, seed
        self.rot90, self.shift = rot90, shift
        self.colour_jitter = colour_jitter
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``index`` as uint8 tensors resized to the dataset's size."""
        pair = self.sources[index]
        a, b = pair() if callable(pair) else pair
        return _resize(torch.from_numpy(a), self.size), _resize(torch.from_numpy(b), self.size)

    def _generator(self, index: int, *stream: int) -> torch.Generator:
        """Item ``index``'s random draws this epoch; another ``stream`` draws apart from the first."""
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, index, *stream)) & 0x7FFFFFFF)

    def _draw(self, index: int) -> tuple[int, int, bool, int, int, int]:
        """Item ``index``'s crop corner (y, x), mirroring, quarter turns and move (dy, dx) this epoch."""
        gen = self._generator(index)
        span = self.load_size - self.crop_size + 1
        y, x = torch.randint(span, (2,), generator=gen).tolist()
        flip = bool(torch.rand((), generator=gen) < 0.5)
        # turns and moves drawn last, each only where asked: runs without them see the same crops and flips
        turns = int(torch.randint(4, (), generator=gen)) if self.rot90 else 0
        dy, dx = 0, 0
        if self.shift:
            dy, dx = (torch.randint(2 * self.shift + 1, (2,), generator=gen) - self.shift).tolist()
        return y, x, flip, turns, dy, dx

    def recoloured(self, inputs: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """The batch ``inputs`` (N, 3, H, W) of items ``indices``, each recoloured as drawn for it this
        epoch (its own stream: the crops, flips and moves drawn are those of a run without)."""
        if not self.colour_jitter:
            return inputs
        return torch.stack([Recolouring.draw(self.colour_jitter, self._generator(index, 1))(image)
                            for image, index in zip(inputs, indices)])

    def placement(self, index: int) -> tuple[bool, int, int] | None:
        """How item ``index`` is its pair this epoch (mirrored, moved by dy, dx), where that is all
        that changes it from epoch to epoch (the whole pair, no quarter turns); None where a crop
        or turn does."""
        if not self.augment:
            return False, 0, 0
        if self.size != self.crop_size or self.rot90:
            return None
        _, _, flip, _, dy, dx = self._draw(index)
        return flip, dy, dx

    def whole(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``index`` as it is kept, without this epoch's augmentation; float, in [-1, 1]."""
        a, b = self.kept[index] if self.kept is not None else self._read(index)
        return to_model_range(a), to_model_range(b)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float tensors in [-1, 1]; the same crop, flip, turn and move for input and target."""
        if not self.augment:
            return self.whole(index)
        a, b = self.kept[index] if self.kept is not None else self._read(index)
        y, x, flip, turns, dy, dx = self._draw(index)
        a = a[:, y : y + self.crop_size, x : x + self.crop_size]
        b = b[:, y : y + self.crop_size, x : x + self.crop_size]
        if flip:
            a, b = a.flip(-1), b.flip(-1)
        if turns:
            a, b = a.rot90(turns, (-2, -1)), b.rot90(turns, (-2, -1))
        return moved(to_model_range(a), dy, dx), moved(to_model_range(b), dy, dx)


def to_model_range(img: torch.Tensor) -> torch.Tensor:
    return img.float() / 127.5 - 1.0


def from_model_range(img: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1] to float 0..255, rounded the way the uint8 output is."""
    return ((img.float().clamp(-1, 1) + 1.0) * 127.5).round()


@dataclass(frozen=True)
class AlignedPair:
    """One image of a pix2pix aligned folder, read when called: A on the left half, B on the right
    (``BtoA``: the other way round)."""

    path: Path
    direction: str = "AtoB"

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        img = read_image(self.path)
        w = img.shape[-1] // 2
        a, b = img[:, :, :w], img[:, :, w : 2 * w]
        return (a, b) if self.direction == "AtoB" else (b, a)


@dataclass(frozen=True)
class TilePair:
    """A satellite tile and its map tile of a ``geosat2map tiles`` folder, read when called."""

    sat: Path
    map: Path

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return read_image(self.sat), read_image(self.map)


@dataclass(frozen=True)
class RecolouredPair:
    """A pair (arrays, or a source above) with its input recoloured as :data:`recolour.SHIFTS` names
    (``evaluate --recolour``) and its map as it is, read when called."""

    pair: tuple[np.ndarray, np.ndarray] | Callable[[], tuple[np.ndarray, np.ndarray]]
    shift: str

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.pair() if callable(self.pair) else self.pair
        recoloured = SHIFTS[self.shift](to_model_range(torch.from_numpy(a)))
        return from_model_range(recoloured).to(torch.uint8).numpy(), b


def _checked_size(path: Path) -> tuple[int, int]:
    """An image's (width, height) from its header, after the checks :func:`read_image` makes: a
    set read pair by pair must fail before training, not in its hundredth epoch."""
    with _image(path) as src:
        return src.width, src.height


def load_aligned_folder(folder: Path, direction: str = "AtoB", holdout: int = 0, split: str = "train"):
    """Pairs from a pix2pix aligned folder: each image is A on the left half, B on the right."""
    if direction not in ("AtoB", "BtoA"):
        raise DataError(f"direction must be AtoB or BtoA, not {direction}")
    files = holdout_split(list_images(folder), holdout, split)
    for path in files:
        width, h = _checked_size(path)
        if abs(width // 2 - h) > 1:  # a plain image would be cut into two unrelated halves and trained on
            raise DataError(f"{path} is {width} x {h}: an aligned pair is A and B side by side, "
                            "twice as wide as tall (or use a `geosat2map tiles` folder)")
    return [AlignedPair(path, direction) for path in files], [p.name for p in files]


def load_tile_folder(folder: Path, split: str = "train"):
    """Pairs from a ``geosat2map tiles`` output: ``SPLIT/sat/NAME.tif`` with ``SPLIT/map/NAME.tif``."""
    splits = ["train", "val"] if split == "all" else [split]
    pairs, names = [], []
    for s in splits:
        sat_dir = folder / s / "sat"
        if not sat_dir.is_dir():
            continue
        for sat in list_images(sat_dir, allow_empty=True):  # a small region may give no val tiles
            target = folder / s / "map" / sat.name
            if not target.is_file():
                raise DataError(f"tile {sat} has no map tile at {target}")
            _checked_size(sat)
            _checked_size(target)
            pairs.append(TilePair(sat, target))
            names.append(f"{s}/{sat.name}")
    return pairs, names


def is_tile_folder(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def tile_folder_gsd(folder: str | Path, size: int | None = None) -> float | None:
    """The ground sampling distance a ``geosat2map tiles`` folder was cut at (None for other data);
    given ``size``, the one its tiles show resized to ``size`` pixels, as training validates a
    model on them and records it for translate (tiles of 512 pixels cut at 0.15 m show 0.30 m at
    256: recording 0.15 m had translate feed the model a scale twice finer than it learned)."""
    folder = Path(folder)
    if not is_tile_folder(folder):
        return None
    manifest = folder / "manifest.json"
    try:
        made = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest} is unreadable ({first_line(exc)}): is {folder} a `geosat2map tiles` folder?") \
            from None
    if not isinstance(made, dict):
        raise DataError(f"{manifest} is not a JSON object: is {folder} a `geosat2map tiles` folder?")
    gsd = made.get("gsd_m")
    if gsd is not None and not (fits(gsd, float) and math.isfinite(gsd) and gsd > 0):  # JSON allows Infinity
        raise DataError(f"{manifest} gives gsd_m {json.dumps(gsd)}, not a resolution in metres per pixel")
    if gsd is None or size is None:
        return gsd
    tiles = [p for s in ("train", "val") if (folder / s / "sat").is_dir()
             for p in list_images(folder / s / "sat", allow_empty=True)[:1]]
    if not tiles:
        return gsd
    with _image(tiles[0]) as src:
        return gsd * src.width / size


def data_gsd(folders: str | Path | Sequence[str | Path], size: int | None = None) -> float | None:
    """The ground sampling distance the tile folders among ``folders`` share (None if none is one),
    as their tiles show it resized to ``size`` pixels where given (see :func:`tile_folder_gsd`); a
    :class:`DataError` if they differ, which one model cannot learn as one."""
    cut = {str(f): tile_folder_gsd(f, size) for f in as_folders(folders)}
    found = sorted({round(g, 3) for g in cut.values() if g is not None})
    if len(found) > 1:
        listed = ", ".join(f"{f} at {g:.2f} m" for f, g in cut.items() if g is not None)
        seen = f" as {size}-pixel pairs" if size is not None else ""
        raise DataError(f"the tile folders show the ground at different resolutions{seen} ({listed}): cut them at "
                        "one (tiles --resolution, --tile-size), or give the one to record with --gsd")
    return next((g for g in cut.values() if g is not None), None)


def load_pairs(folders: str | Path | Sequence[str | Path], split: str, direction: str = "AtoB", holdout: int = 10):
    """Pairs and names for ``split`` (train/val/all) of an aligned folder or a tile folder, or of
    several in turn (the user's region beside the data a model learned from, so that fine-tuning
    does not forget it); with several, each name starts with its folder's."""
    listed = as_folders(folders)
    pairs, names = [], []
    for folder in listed:
        if folder.is_file():
            raise DataError(f"{folder} is a file, not a folder of pairs")
        if not folder.is_dir():
            raise DataError(f"data folder not found: {folder}")
        found, found_names = (load_tile_folder(folder, split) if is_tile_folder(folder)
                              else load_aligned_folder(folder, direction, holdout, split))
        pairs += found
        names += found_names if len(listed) == 1 else [f"{folder.name}/{n}" for n in found_names]
    return pairs, names


def as_folders(folders: str | Path | Sequence[str | Path]) -> list[Path]:
    """One folder or several, as paths (a run's config records one as a str, several as a list)."""
    return [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]


def folders_text(folders: str | Path | Sequence[str | Path]) -> str:
    """One folder or several in words, for messages: 'tiles, ../maps_train'."""
    return ", ".join(str(f) for f in as_folders(folders))
