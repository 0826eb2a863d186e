"""The generator weights file: safetensors tensors plus the metadata translate needs.

safetensors stores raw tensors and a string map, so loading a file can never run code (a
pickled ``.pt`` can). The metadata is one JSON document under the ``geosat2map`` key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import OutputError, WeightsError, first_line
from .model import UNetGenerator
from .records import field_problem

FORMAT = "geosat2map-generator/1"
DEFAULT_WEIGHTS_NAME = "default_generator.safetensors"
#: Provenance "weights" of a run's trained weights saved apart from its moving average.
TRAINED_WEIGHTS = "the trained weights, not the run's moving average"


@dataclass(frozen=True)
class ModelSpec:
    """What a generator expects and where it came from.

    ``gsd_m`` is the ground sampling distance (metres per pixel) of the imagery the model was
    trained on: translate resamples scenes to it so roads and buildings have the size the
    model learned. Pixel values are scaled from ``[0, 255]`` to ``[-1, 1]`` in and out.
    """

    ngf: int = 64
    in_channels: int = 3
    out_channels: int = 3
    arch: str = "unet256"
    norm: str = "batch"
    tile_size: int = 256
    input_bands: str = "RGB"
    value_scaling: str = "uint8 [0,255] -> [-1,1]"
    gsd_m: float | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A weights file's metadata is JSON any tool can write: a wrong type is named here, not
        # met as a traceback from the network's constructor.
        problem = field_problem(type(self), vars(self))
        if problem:
            raise WeightsError(f"the model's description is unreadable: {problem}")
        sizes = {"ngf": self.ngf, "in_channels": self.in_channels, "out_channels": self.out_channels,
                 "tile_size": self.tile_size}
        for name, size in sizes.items():
            if size < 1:
                raise WeightsError(f"the model's description is unreadable: {name} is {size}, not a size")
        # translate resamples scenes to this size: zero or less would ask for an infinite raster
        if self.gsd_m is not None and not (math.isfinite(self.gsd_m) and self.gsd_m > 0):
            raise WeightsError(f"the ground sampling distance must be positive metres per pixel, not {self.gsd_m}")

    def build(self) -> UNetGenerator:
        if self.arch != "unet256" or self.norm != "batch":
            raise WeightsError(f"unsupported architecture {self.arch}/{self.norm}")
        return UNetGenerator(self.in_channels, self.out_channels, self.ngf)


#: Suffix of the per-slice scales stored beside a convolution weight kept as int8.
INT8_SCALE = ".int8_scale"
#: int8 storage quantises only convolution weights this large: all but the outermost (the first
#: two convolutions and the last, which see and write pixels: 81 k of a width-48 generator's 30.6 M
#: weights), which stay fp16. Quantising them too cost that generator 0.0002-0.0004 of held-out
#: SSIM; keeping the outer three levels on each side (1.1 M) in fp16 gained no more than these
#: three, and made the file 30.3 MiB.
INT8_MIN_ELEMENTS = 2**17


#: Suffix of the per-group scales stored beside a convolution weight kept as 4-bit codes.
INT4_SCALE = ".int4_scale"
#: int4 storage codes convolution weights this large (the inner levels: 28.3 M of a width-48
#: generator's 30.6 M weights) in 4 bits, the rest of those over INT8_MIN_ELEMENTS in int8. Coding
#: every convolution over INT8_MIN_ELEMENTS in 4 bits cost w48_r6 0.020 of held-out acc@5 (its fp32
#: weights 0.5426, these alone in 4 bits 0.5420).
INT4_MIN_ELEMENTS = 2**21
#: Weights sharing one fp16 scale in int4 storage (a quarter of a bit more per weight).
INT4_GROUP = 64
#: The 16 levels a 4-bit code stands for, times its group's largest magnitude: quantiles of a
#: normal distribution (QLoRA's NF4), denser near zero, where most weights are.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])
#: The 15 points halfway between consecutive levels: a scaled weight is coded as the nearest level.
#: Python floats (as are the levels in ``_NF4_VALUES``), constants to torch.compile.
NF4_MIDPOINTS = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).tolist()
_NF4_VALUES = NF4_LEVELS.tolist()


#: How :func:`save_generator` can store the tensors; :func:`load_generator` reads each back to fp32.
STORAGE = ("fp32", "fp16", "int8", "int4")


def _int4_scaled(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` in groups of :data:`INT4_GROUP` consecutive weights, each divided by its fp16
    scale (the group's largest magnitude), and those scales."""
    groups = weight.float().reshape(-1, INT4_GROUP)
    scale = groups.abs().amax(dim=1).half().clamp_min(2**-24)
    return groups / scale.float()[:, None], scale


def _int4_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as 4-bit codes into :data:`NF4_LEVELS`, two to a byte, and one fp16 scale per
    :data:`INT4_GROUP` consecutive weights (their largest magnitude)."""
    scaled, scale = _int4_scaled(weight)
    # The nearest level's code is the number of midpoints between levels below the value (ties go
    # down). Counted with 15 comparisons: twice as fast as torch.bucketize on CPU.
    codes = torch.zeros(scaled.shape, dtype=torch.uint8, device=weight.device)
    for midpoint in NF4_MIDPOINTS:
        codes += scaled > midpoint
    codes = codes.reshape(-1)
    return codes[0::2] | (codes[1::2] << 4), scale


def int4_rounded(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as int4 storage codes and loads it back (:func:`stored_value` of a tensor
    :func:`int4_coded`), computed elementwise, with no codes packed and unpacked: written for
    torch.compile to fuse into one pass (storage-aware training rounds 28 M weights at every
    step). The nearest level, ties down, as :func:`_int4_codes` codes it."""
    scaled, scale = _int4_scaled(weight)
    level = torch.full_like(scaled, _NF4_VALUES[0])
    for midpoint, above in zip(NF4_MIDPOINTS, _NF4_VALUES[1:]):
        level = torch.where(scaled > midpoint, above, level)
    return (level * scale.float()[:, None]).reshape(weight.shape)


def int4_coded(value: torch.Tensor) -> bool:
    """Whether int4 storage codes this generator tensor in 4 bits (the rest it stores as int8 does)."""
    return (value.is_floating_point() and value.dim() == 4 and value.numel() >= INT4_MIN_ELEMENTS
            and value.numel() % INT4_GROUP == 0)


def _int4_weight(packed: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The float32 weight of :func:`_int4_codes`'s codes and scales."""
    # Each byte's two levels looked up at once, by int32 index: twice as fast as unpacking the
    # nibbles and indexing with int64 (storage-aware training does this at every step).
    pairs = torch.stack([NF4_LEVELS.repeat(16), NF4_LEVELS.repeat_interleave(16)], 1).to(packed.device)
    levels = torch.index_select(pairs, 0, packed.int())
    return (levels.reshape(-1, INT4_GROUP) * scale.float()[:, None]).reshape(shape)


def stored_state(model: torch.nn.Module, storage: str = "fp32") -> dict[str, torch.Tensor]:
    """The generator's tensors as a weights file stored as ``storage`` (one of :data:`STORAGE`) holds them.

    ``fp16`` halves the size. ``int8`` stores each convolution weight of at least
    :data:`INT8_MIN_ELEMENTS` as int8 with one fp32 scale per slice of its first dimension
    (symmetric, the slice's largest magnitude maps to 127) and the rest as fp16: those weights are
    nearly all of a generator's size, so the file is not much over a quarter of fp32's (a width-48
    generator: 29.3 MiB against 58 MiB in fp16). ``int4`` codes the convolution weights of at
    least :data:`INT4_MIN_ELEMENTS` in 4 bits (:func:`_int4_codes`) and stores the rest as
    ``int8`` does: 16.7 MiB for that generator.
    """
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {STORAGE}, not {storage!r}")
    state = {}
    for key, value in model.state_dict().items():
        state.update(_stored(key, value.detach().cpu().contiguous(), storage))
    return state


def _stored(key: str, value: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """The tensors a file stored as ``storage`` holds for the generator's tensor ``key``."""
    convolution = value.is_floating_point() and value.dim() == 4
    if storage == "int4" and int4_coded(value):
        codes, scale = _int4_codes(value)
        return {key: codes, key + INT4_SCALE: scale}
    if storage in ("int8", "int4") and convolution and value.numel() >= INT8_MIN_ELEMENTS:
        scale = value.float().abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127
        codes = (value.float() / scale[:, None, None, None]).round().clamp(-127, 127).to(torch.int8)
        return {key: codes, key + INT8_SCALE: scale}
    if storage != "fp32" and value.is_floating_point():
        value = value.half()
    return {key: value}


def stored_value(value: torch.Tensor, storage: str) -> torch.Tensor:
    """One generator tensor as a file stored as ``storage`` loads it back (fp32, on ``value``'s
    device): the rounding that storage-aware training (``train --storage-aware``) makes the
    generator compute with."""
    return _restored_state(_stored("t", value.detach().contiguous(), storage), {"t": value.shape}, storage)["t"]


def _restored_state(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], source: str | Path) -> dict:
    """:func:`stored_state`'s tensors back to the float32 state dict of a generator whose tensors
    have ``shapes``; ``source`` names them in errors."""
    state = dict(state)
    for key in [k for k in state if k.endswith(INT8_SCALE)]:  # int8 weights back to float
        scale, weight = state.pop(key), key.removesuffix(INT8_SCALE)
        state[weight] = state[weight].float() * scale[:, None, None, None]
    for key in [k for k in state if k.endswith(INT4_SCALE)]:  # 4-bit codes back to float
        scale, weight = state.pop(key), key.removesuffix(INT4_SCALE)
        if weight not in shapes or state[weight].numel() * 2 != math.prod(shapes[weight]):
            raise WeightsError(f"{source} does not fit its declared architecture: {weight} has "
                               f"{state[weight].numel() * 2} 4-bit codes")
        state[weight] = _int4_weight(state[weight], scale, shapes[weight])
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def as_stored(model: UNetGenerator, spec: ModelSpec, storage: str) -> UNetGenerator:
    """A copy of ``model`` (on the CPU, in eval mode) with the weights a file stored as ``storage``
    loads back: what to score before writing an fp16, int8 or int4 file, whose rounding costs a
    little of the score the fp32 weights reached."""
    copy = spec.build()
    shapes = {k: v.shape for k, v in copy.state_dict().items()}
    copy.load_state_dict(_restored_state(stored_state(model, storage), shapes, f"{storage} storage"))
    return copy.eval()


def save_generator(model: torch.nn.Module, spec: ModelSpec, path: str | Path, storage: str = "fp32") -> None:
    """Write the generator's state dict (as :func:`stored_state` stores it) and spec."""
    state = stored_state(model, storage)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    # Serialised here and written with an ordinary open(): safetensors 0.8's save_file goes through
    # a private temporary file (mode 0600, safetensors issue #782) that other users could not load.
    # The file so gets the process umask's mode without reading the umask (which means setting
    # it, racing other threads); an overwritten file keeps its mode.
    spec = replace(spec, provenance=compact_lineage(spec.provenance))
    data = save(state, metadata={"format": FORMAT, "geosat2map": json.dumps(asdict(spec))})
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        tmp.replace(path)
    except BaseException as exc:  # a full disk, Ctrl-C: no half-written .part left behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"writing {path} failed: {exc.strerror or first_line(exc)}") from None
        raise


#: What a repeated ancestor's provenance is replaced by (see :func:`compact_lineage`).
RECORDED_ABOVE = "recorded above (same sha256)"


def compact_lineage(provenance: dict) -> dict:
    """The provenance with each ancestor's own provenance written once.

    Lineage entries (``{"file", "sha256", "provenance"}``: fine_tuned_from, distilled_from, each
    of averaged_from) nest their generator's whole provenance. A cycle that starts from and is
    taught by the same generator recorded it twice, and a chain of such cycles doubled the record
    each time (after eight: 5.9 MB of JSON, a 33.8 MB file for 27 MB of weights). An ancestor
    met again, depth first, keeps its file and sha256 and points to the first record instead.
    """
    seen: set[str] = set()

    def walk(node):
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("sha256"), str) and "provenance" in node:
            if node["sha256"] in seen:
                return {**node, "provenance": RECORDED_ABOVE}
            seen.add(node["sha256"])
        return {key: walk(value) for key, value in node.items()}

    return walk(provenance)


def read_spec(path: str | Path) -> ModelSpec:
    """The spec of a weights file, read from its header only."""
    from safetensors import safe_open

    if Path(path).is_dir():
        if (Path(path) / "config.json").is_file():
            raise WeightsError(f"{path} is a training run, not a weights file: `geosat2map export-weights {path} "
                               "OUT.safetensors` makes one")
        # train makes its folder first and writes config.json once the data and networks are loaded
        starting = "" if any(Path(path).iterdir()) else " (empty: a training run just started has no config.json yet)"
        raise WeightsError(f"{path} is a folder, not a weights file{starting}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"not a safetensors weights file: {path} ({exc})") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a geosat2map generator (format {meta.get('format')!r})")
    try:
        described = json.loads(meta["geosat2map"])
        if not isinstance(described, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(set(described) - {f.name for f in fields(ModelSpec)})
        if unknown:  # a field can change how the network is built: guessing could run another model
            raise WeightsError(f"describes the model with {', '.join(unknown)}, which this version of geosat2map "
                               "does not know: made by a newer one? upgrade geosat2map to load it")
        return ModelSpec(**described)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path} has unreadable metadata ({exc})") from None


def load_generator(path: str | Path | None = None) -> tuple[UNetGenerator, ModelSpec]:
    """Build the generator a weights file describes and load it, in float32 and eval mode.

    ``path=None`` loads the default model shipped in the package.
    """
    if path is None:
        path = default_weights_path()
    spec = read_spec(path)
    model = spec.build()
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"cannot read tensors from {path} ({exc})") from None
    state = _restored_state(state, {k: v.shape for k, v in model.state_dict().items()}, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit its declared architecture: {first_line(exc)}") from None
    return model.eval(), spec


def default_weights_path() -> Path:
    """The generator shipped in the package; a clear error while none has been trained."""
    path = Path(str(resources.files("geosat2map") / "weights" / DEFAULT_WEIGHTS_NAME))
    if not path.is_file():
        raise WeightsError(
            "no default model is shipped yet (geosat2map/weights/"
            f"{DEFAULT_WEIGHTS_NAME} is missing): pass --weights PATH"
        )
    return path


#: Digests of live models with the state they were computed on: hashing a 27 MB generator takes
#: ~0.05 s, paid again for every scene of a run without this.
_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the generator's tensors (names, dtypes, shapes and values).

    Remembered per model while its tensors stay the same ones, unmodified (storage address and
    PyTorch's in-place version counter), so training a model in place gets a fresh digest.
    """
    state = model.state_dict()
    stamp = tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in state.items())
    known = _digests.get(model)
    if known is not None and known[0] == stamp:
        return known[1]
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _digests[model] = (stamp, h.hexdigest())
    return h.hexdigest()


@dataclass(frozen=True)
class WeightsInfo:
    """What a weights file holds, read from its header (the tensors are not loaded)."""

    path: Path
    bytes: int
    sha256: str  # of the file, to compare with a published checksum
    dtype: str  # the stored floating-point type: float16 for shipped files
    parameters: int  # learned values (BatchNorm's running statistics left out)
    spec: ModelSpec
    #: :func:`model_digest` of the loaded generator: what translated maps (GEOSAT2MAP_MODEL_SHA256),
    #: resume records and other generators' provenance name it by
    model_sha256: str

    def as_dict(self) -> dict:
        return {"file": str(self.path), "bytes": self.bytes, "sha256": self.sha256, "dtype": self.dtype,
                "parameters": self.parameters, "model_sha256": self.model_sha256, "spec": asdict(self.spec)}


def describe_weights(path: str | Path | None = None) -> WeightsInfo:
    """The :class:`WeightsInfo` of a weights file (``None``: the shipped model); the tensors are
    loaded only for :attr:`WeightsInfo.model_sha256`."""
    from safetensors import safe_open

    path = Path(path) if path is not None else default_weights_path()
    spec = read_spec(path)
    dtypes, parameters = set(), 0
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for key in keys:
            tensor = f.get_slice(key)
            if key.endswith(("running_mean", "running_var", "num_batches_tracked", INT8_SCALE, INT4_SCALE)):
                continue
            coded = key + INT4_SCALE in keys  # two 4-bit codes to a byte
            dtypes.add("int4" if coded else tensor.get_dtype())
            parameters += math.prod(tensor.get_shape()) * (2 if coded else 1)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    dtype = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "I8": "int8"}
    return WeightsInfo(path, path.stat().st_size, digest.hexdigest(),
                       ", ".join(sorted(dtype.get(d, d) for d in dtypes)), parameters, spec,
                       model_digest(load_generator(path)[0]))
