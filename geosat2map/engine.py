"""Running the generator on batches of tiles, with PyTorch (eager or compiled) or ONNX Runtime.

The model runs in eval mode: BatchNorm uses its learned running statistics and dropout is off,
so a tile's output depends only on that tile, never on the other tiles in its batch (the
pix2pix reference keeps train-mode BatchNorm at test time, which couples batch mates).

On the CPU, ONNX Runtime runs the same generator about a quarter faster than eager PyTorch on
these 2-core machines (10.2 against 13.1 ms per 256-pixel tile, width 32, batch 8).
:func:`make_engine` picks the faster of the two by timing both on the scene's batch size, once
the generator has been exported to ONNX (cached by weights digest, so only the first run of a
model pays the few seconds of export); the pick is kept in the same cache folder, per machine and
library versions, so later runs of the same command run the same engine and make the same map.
Where the hardware multiplies bf16 (CUDA GPUs, CPUs with AMX or AVX512-BF16) PyTorch under bf16
autocast is a third candidate (``torch-bf16``): 2.5x the fp32 throughput on 2 AMX cores, its maps
within 3 levels of fp32's at 99.9 % of values (NAIP sample). GPUs use PyTorch only.
``translate --tta-median`` runs on any of them (:class:`MedianOfViewsEngine`).
``compiled`` (:class:`CompiledEngine`) is asked for, never picked: it takes seconds to compile.
Nor is ``int8`` (ONNX Runtime on the model quantized with ranges from the scene's own tiles,
:mod:`geosat2map.quantize`): 1.4x fp32 on the AVX2 machine, but its map differs a little more.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .allocator import release_freed_memory
from .cache import cache_dir
from .devices import PRECISIONS as COMPUTE_PRECISIONS, use_bf16
from .errors import WeightsError, first_line
from .files import write_text_whole
from .model import MEDIAN_VIEWS, PixelScaled, ViewMedian, median_of_views
from .onnx_export import export_proto
from .quantize import quantized_onnx
from .weights import model_digest

#: Scenes with fewer tiles run on PyTorch: exporting (first run of a model, seconds) and timing
#: both engines (about half a second) would cost more than ONNX Runtime saves on them.
AUTO_MIN_TILES = 200
BACKENDS = ("auto", "torch", "compiled", "onnxruntime")
#: What translate computes in: the compute precisions, and int8 (ONNX Runtime on the CPU, opt-in:
#: its maps differ from fp32's a little more, see geosat2map.quantize).
PRECISIONS = (*COMPUTE_PRECISIONS, "int8")
#: Tiles per model call on the CPU. Batches 1-32 on 2 cores (width-32 default model, tiles/s):
#: ONNX Runtime 32 / 29 / 29 / 34 / 34 / 33, PyTorch 21 / 26 / 29 / 28 / 25 / 22; every tile of a
#: batch is held as float32 input and output (1.5 MB at 256 pixels).
CPU_BATCH = 8
#: bf16 on AMX gains more from larger batches (2 cores, tiles/s for batches 4 / 8 / 16 / 32: 154 /
#: 178 / 214 / 237); 16 took translate of 8192 x 8192 from 136.6 to 157.5 tiles/s for 210 MB more
#: peak memory (1102 MB), 32 to 162.1 for 740 MB more.
CPU_BATCH_BF16 = 16
#: A GPU's batch is sized to its free memory, up to this: larger batches only hold more tiles in
#: flight (the CPU side feeds a few hundred to a few thousand tiles/s, see benchmarks/pipeline.py).
GPU_BATCH_MAX = 128

# Kept across calls in one process (several scenes, a Python loop): opening an ONNX Runtime session
# costs 0.1-0.3 s and timing both engines about 0.5 s, more than a small scene's whole run.
_sessions: dict[tuple[Path, int], OnnxRuntimeEngine] = {}  # the most recent session only
_compiled: dict[tuple, CompiledEngine] = {}  # the most recent compiled engine only (seconds to compile)
_choices: dict[tuple, str] = {}  # auto's pick per model, candidates and batch shape


def engine_name(backend: str, precision: str = "fp32") -> str:
    """What an engine is called (reported, and kept in a resumable run's record): its backend,
    with ``-bf16`` or ``-int8`` when it does not compute in fp32."""
    return backend if precision == "fp32" else f"{backend}-{precision}"


def engine_choice(name: str) -> tuple[str, str]:
    """The ``(backend, precision)`` that makes the engine called ``name`` again."""
    backend, _, precision = name.partition("-")
    return backend, precision or "fp32"


class Engine(Protocol):
    """Float32 0..255 tiles (N, C, T, T) in, float32 0..255 map tiles (N, 3, T, T) out.

    ``submit`` starts a batch and returns a function that waits for its maps: on a GPU the batch
    runs while the caller blends the previous one and reads the next; on the CPU it has already run.
    """

    name: str
    #: True when ``submit`` returns before the batch has run (translate then keeps one in flight).
    asynchronous: bool

    def __call__(self, tiles: np.ndarray) -> np.ndarray: ...

    def submit(self, tiles: np.ndarray) -> Callable[[], np.ndarray]: ...


class InferenceEngine:
    """The generator in PyTorch, on any device, in fp32 or under bf16 autocast."""

    def __init__(self, model: torch.nn.Module, device: torch.device, bf16: bool = False) -> None:
        self.device = device
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.bf16 = bf16
        self.name = engine_name("torch", "bf16" if bf16 else "fp32")
        self.cuda = self.asynchronous = device.type == "cuda"

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.submit(tiles)()

    @torch.inference_mode()
    def run(self, tiles: torch.Tensor) -> torch.Tensor:
        """0..255 tiles already on the device (uint8 or float) in, float32 0..255 maps out, on the
        device (queued, on a GPU: nothing waits for them)."""
        # One buffer each way, scaled in place, instead of a temporary per operation (each a fresh
        # allocation of a batch's size, see geosat2map.allocator). The maps come out contiguous
        # (the model's output is channels_last), the layout the blending walks.
        x = torch.empty(tiles.shape, dtype=torch.float32, device=tiles.device, memory_format=torch.channels_last)
        torch.mul(tiles, 1.0 / 127.5, out=x).sub_(1.0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            y = self.forward(x)
        maps = torch.empty(y.shape, dtype=torch.float32, device=y.device)
        return maps.copy_(y).clamp_(-1.0, 1.0).add_(1.0).mul_(127.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The generator on a scaled batch."""
        return self.model(x)

    @torch.inference_mode()
    def submit(self, tiles: np.ndarray) -> Callable[[], np.ndarray]:
        x = torch.from_numpy(tiles)
        if self.cuda:  # page-locked host memory: the copies to and from the GPU run asynchronously
            x = x.pin_memory()
        y = self.run(x.to(self.device, non_blocking=True))
        if not self.cuda:
            out = y.cpu().numpy()
            return lambda: out
        host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(y, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def result() -> np.ndarray:
            copied.synchronize()
            return host.numpy()

        return result


class CompiledEngine(InferenceEngine):
    """The generator compiled by torch.compile (inductor, weights frozen into the graph), on the CPU.

    Frozen, the convolutions' weights are packed once, in bf16 where the engine runs bf16, instead
    of being cast at every call: 2 AMX cores ran 255-289 tiles/s against eager's 202-217 (batch 16,
    width 32, bf16); fp32 gained nothing (67-69 against 64-67). Compiling takes 23 s the first
    time and about 6 s once inductor's cache (in the temporary folder) holds the graph, so it pays
    off only over many tiles: a very large scene, or many scenes in one call (the engine is kept
    for the next scene). The graph is compiled for one batch size; a shorter last batch is padded
    to it rather than compiled again.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, bf16: bool, batch_size: int) -> None:
        super().__init__(model, device, bf16)
        self.name = engine_name("compiled", "bf16" if bf16 else "fp32")
        self.batch_size = batch_size
        self.compiled = torch.compile(self.model, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor

        n = x.shape[0]
        if n < self.batch_size:  # pad rather than compile again for the shorter batch
            padded = torch.empty((self.batch_size, *x.shape[1:]), dtype=x.dtype, device=x.device,
                                 memory_format=torch.channels_last)
            padded[:n] = x
            padded[n:] = 0
            x = padded
        with inductor.patch(freezing=True):
            return self.compiled(x)[:n]


class OnnxRuntimeEngine:
    """The generator exported to ONNX (fp32, or int8 by :mod:`geosat2map.quantize`), run by ONNX
    Runtime on the CPU."""

    asynchronous = False

    def __init__(self, onnx_path: Path, name: str = "onnxruntime") -> None:
        import onnxruntime as ort

        self.name = name

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores PyTorch would use
        # Memory-pattern planning keeps a second copy of the activations: off, it saved ~90 MB of
        # peak memory at batch 8 and was no slower (10.0 against 10.3 ms/tile).
        options.enable_mem_pattern = False
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"tiles": np.ascontiguousarray(tiles, np.float32)})[0]

    def submit(self, tiles: np.ndarray) -> Callable[[], np.ndarray]:
        out = self(tiles)
        return lambda: out


class MedianOfViewsEngine:
    """``translate --tta-median`` on any engine: :func:`~geosat2map.model.median_of_views` with the
    ``inner`` engine making each view's maps, so the median runs in ONNX Runtime, int8 or compiled
    too (on CPUs without bf16 those are the fastest engines, and the median costs 18 passes)."""

    asynchronous = False

    def __init__(self, inner: Engine, shift: int) -> None:
        self.inner = inner
        self.shift = shift
        self.name = inner.name  # what computes the maps (a resumed run makes the same engine again)

    def _maps(self, views: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.inner(views.numpy()))

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return median_of_views(torch.from_numpy(np.ascontiguousarray(tiles, np.float32)), self._maps,
                               self.shift).numpy()

    def submit(self, tiles: np.ndarray) -> Callable[[], np.ndarray]:
        out = self(tiles)
        return lambda: out


def batch_for_memory(free_bytes: int, per_tile_bytes: float, most: int = GPU_BATCH_MAX) -> int:
    """The largest power of two of tiles, at most ``most``, whose memory fits in ``free_bytes``
    (at least 1)."""
    fits = int(free_bytes // max(per_tile_bytes, 1.0))
    n = 1
    while n * 2 <= min(fits, most):
        n *= 2
    return n


def auto_batch_size(model: nn.Module, device: torch.device, in_channels: int = 3, tile: int = 256,
                    precision: str = "auto") -> int:
    """On the CPU (and MPS) ``CPU_BATCH``, or ``CPU_BATCH_BF16`` where ``precision`` means bf16; on
    CUDA as many tiles as half the free memory holds, by the peak memory of a trial batch at
    ``precision`` (up to ``GPU_BATCH_MAX``)."""
    if device.type != "cuda":
        return CPU_BATCH_BF16 if device.type == "cpu" and use_bf16(precision, device) else CPU_BATCH
    probe = 4
    engine = InferenceEngine(model, device, use_bf16(precision, device))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    engine(np.zeros((probe, in_channels, tile, tile), np.float32))
    per_tile = (torch.cuda.max_memory_allocated(device) - before) / probe
    free, _ = torch.cuda.mem_get_info(device)
    return batch_for_memory(free // 2, per_tile)


def onnx_available() -> bool:
    """Whether the onnx extra is installed, without importing it (importing onnx takes about a
    second, more than a small scene's whole run)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def engine_onnx(model: nn.Module, in_channels: int, tile: int) -> Path:
    """The ONNX export of ``model`` for ``OnnxRuntimeEngine`` (any batch size), exported once per weights."""
    digest = model_digest(model)
    path = cache_dir() / f"engine-{digest[:32]}-{in_channels}x{tile}.onnx"
    if path.exists():
        return path
    import onnx  # about a second to import: only when exporting

    path.parent.mkdir(parents=True, exist_ok=True)
    proto = export_proto(PixelScaled(model.float().eval().cpu()), torch.zeros(2, in_channels, tile, tile), "tiles",
                         "maps", dynamic_batch=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    finally:  # a full disk or Ctrl-C mid-write: no export-sized file left behind in the cache
        tmp.unlink(missing_ok=True)
    del proto
    release_freed_memory()  # the export's tracing: about 0.5 GB for the width-48 model
    return path


def _cached_session(make: Callable[[], Path], name: str = "onnxruntime") -> OnnxRuntimeEngine:
    """ONNX Runtime on the model file ``make`` finds in the cache or exports into it. A cached file
    ONNX Runtime cannot load (damaged, say, or written by an onnx release newer than this ONNX
    Runtime reads) is made again, once; a fresh one it cannot load is a :class:`WeightsError`."""
    path = make()
    try:
        return _ort_engine(path, name)
    except Exception:  # ONNX Runtime's errors (InvalidProtobuf, Fail, ...) derive from Exception alone
        path.unlink(missing_ok=True)
    path = make()
    try:
        return _ort_engine(path, name)
    except Exception as exc:
        raise WeightsError(f"ONNX Runtime cannot load the model exported to {path}: {first_line(exc)} (use "
                           "--backend torch)") from None


def _ort_engine(onnx_path: Path, name: str = "onnxruntime") -> OnnxRuntimeEngine:
    key = (onnx_path, torch.get_num_threads())
    if key not in _sessions:
        _sessions.clear()
        _sessions[key] = OnnxRuntimeEngine(onnx_path, name)
    return _sessions[key]


def _int8_engine(model: nn.Module, device: torch.device, backend: str,
                 calibration: np.ndarray | None) -> OnnxRuntimeEngine:
    """ONNX Runtime on ``model`` in int8, its activation ranges from the ``calibration`` tiles."""
    if device.type != "cpu":
        raise WeightsError("int8 runs on the CPU (ONNX Runtime); use --device cpu")
    if backend not in ("auto", "onnxruntime"):
        raise WeightsError(f"int8 runs through ONNX Runtime: use --backend auto or onnxruntime, not {backend}")
    if not onnx_available():
        raise WeightsError("int8 needs the onnx extra: pip install 'geosat2map[onnx]'")
    if calibration is None or not len(calibration):
        raise ValueError("int8 needs calibration tiles")
    try:
        return _cached_session(lambda: quantized_onnx(model, calibration, cache_dir()),
                               engine_name("onnxruntime", "int8"))
    except OSError as exc:
        raise WeightsError(f"cannot keep the int8 model in {cache_dir()}: {exc} (set GEOSAT2MAP_CACHE)") from None


def _seconds_per_batch(engine: Engine, batch: np.ndarray, runs: int = 1) -> float:
    engine(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(runs):
        engine(batch)
    return (time.perf_counter() - start) / runs


def make_engine(
    model: nn.Module,
    device: torch.device,
    backend: str = "auto",
    precision: str = "auto",
    *,
    in_channels: int = 3,
    tile: int = 256,
    batch_size: int = 8,
    tiles: int | None = None,
    calibration: np.ndarray | None = None,
) -> Engine:
    """The engine for ``backend`` at ``precision`` (``auto``: bf16 where the hardware has it, see
    :func:`~geosat2map.devices.native_bf16`). Backend ``auto`` times the CPU's candidates (PyTorch
    in fp32 and ONNX Runtime, and PyTorch in bf16 where precision allows it) on one batch and keeps
    the fastest; on GPUs, without the onnx extra, or for scenes under ``AUTO_MIN_TILES`` it is PyTorch.
    ``int8`` is ONNX Runtime on the model quantized with the ``calibration`` tiles' ranges (the
    scene's own, float32 0..255: see :mod:`geosat2map.quantize`)."""
    if backend not in BACKENDS:
        raise WeightsError(f"unknown backend {backend!r} (use {', '.join(BACKENDS)})")
    if isinstance(model, ViewMedian) and (device.type == "cpu" or backend not in ("auto", "torch")):
        # The median has no ONNX or compiled form: any backend maps the views, the CPU takes their
        # median. (On a GPU PyTorch runs the whole ViewMedian, its views never leaving the device.)
        inner = make_engine(model.generator, device, backend, precision, in_channels=in_channels, tile=tile,
                            batch_size=batch_size, tiles=None if tiles is None else tiles * MEDIAN_VIEWS,
                            calibration=calibration)
        return MedianOfViewsEngine(inner, model.shift)
    if precision == "int8":
        return _int8_engine(model, device, backend, calibration)
    bf16 = use_bf16(precision, device)
    if backend == "onnxruntime" and precision == "bf16":
        raise WeightsError("the onnxruntime backend runs in fp32 only; use --backend torch for bf16")
    if backend == "compiled":
        return _compiled_engine(model, device, bf16, batch_size, in_channels, tile)
    torch_engine = InferenceEngine(model, device, bf16)
    if backend == "torch":
        return torch_engine
    if device.type != "cpu":
        if backend == "onnxruntime":
            raise WeightsError("the onnxruntime backend runs on the CPU only; use --device cpu or --backend torch")
        return torch_engine
    if backend == "auto" and (precision == "bf16" or tiles is not None and tiles < AUTO_MIN_TILES):
        return torch_engine
    if backend == "onnxruntime":
        if not onnx_available():
            raise WeightsError("the onnxruntime backend needs the onnx extra: pip install 'geosat2map[onnx]'")
        try:
            return _cached_session(lambda: engine_onnx(model, in_channels, tile))
        except OSError as exc:
            raise WeightsError(f"cannot keep the ONNX export in {cache_dir()}: {exc} (set GEOSAT2MAP_CACHE)") from None
    names = [torch_engine.name, *(["torch"] if bf16 else []), *(["onnxruntime"] if onnx_available() else [])]
    if len(names) == 1:
        return torch_engine

    def build(name: str) -> Engine | None:
        """The candidate called ``name``, made only when it is timed or picked: a remembered
        PyTorch pick then never exports or opens ONNX Runtime (about a second per run here).
        None for ONNX Runtime when its export cannot be kept (no writable cache) or loaded."""
        if name == torch_engine.name:
            return torch_engine
        if name == "torch":
            return InferenceEngine(model, device)
        try:
            return _cached_session(lambda: engine_onnx(model, in_channels, tile))
        except (OSError, WeightsError):
            return None

    key = (model_digest(model), tuple(names), batch_size, in_channels, tile)
    if key not in _choices:
        _choices[key] = _remembered_or_timed(key, build)
        if _choices[key] != "onnxruntime":
            _sessions.clear()  # a session opened only to be timed, with its memory arena
            release_freed_memory()
    return build(_choices[key]) or torch_engine


#: auto's picks kept across runs, in :func:`cache_dir`: the same command on the same machine then
#: runs the same engine and makes the same map (PyTorch and ONNX Runtime differ in the last bits,
#: and where they are level, as on session 14's machine, a fresh timing picks either).
CHOICES_FILE = "engine-choices.json"


def _choice_key(key: tuple) -> str:
    """``key`` with what else decides the timing: the CPU, the threads and the libraries' versions."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:  # not imported: a remembered PyTorch pick never loads it
        ort = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        ort = None
    return json.dumps([*key, cpu, os.cpu_count(), torch.get_num_threads(), torch.__version__, ort])


def _remembered_or_timed(key: tuple, build: Callable[[str], Engine | None]) -> str:
    """The pick an earlier run on this machine kept for ``key``; else make the candidates named in
    ``key`` (``build``; None: left out), time them on one batch and keep the fastest (a missing,
    unreadable or unwritable record: timed, kept in memory only)."""
    path, record = cache_dir() / CHOICES_FILE, _choice_key(key)
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    kept = kept if isinstance(kept, dict) else {}
    _, names, batch_size, in_channels, tile = key
    if kept.get(record) in names:
        return kept[record]
    batch = np.random.default_rng(0).uniform(0, 255, (batch_size, in_channels, tile, tile)).astype(np.float32)
    seconds: dict[str, float] = {}
    for candidate in names:  # one at a time, each one's memory handed back before the next is made
        engine = build(candidate)
        if engine is not None:
            seconds[candidate] = _seconds_per_batch(engine, batch)
        del engine
        release_freed_memory()
    name = min(seconds, key=seconds.__getitem__)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(path, json.dumps({**kept, record: name}, indent=1))
    except OSError:
        pass  # kept in memory only
    return name


def _compiled_engine(model: nn.Module, device: torch.device, bf16: bool, batch_size: int, in_channels: int,
                     tile: int) -> CompiledEngine:
    """The compiled engine for this model and batch shape, compiled now (by one batch of zeros), so
    that a failure is one clear error before any tile is read; kept for the next scene."""
    if device.type != "cpu":
        raise WeightsError("the compiled backend is measured and tested on the CPU only; use --backend torch")
    key = (model_digest(model), bf16, batch_size, in_channels, tile)
    if key not in _compiled:
        engine = CompiledEngine(model, device, bf16, batch_size)
        try:
            engine(np.zeros((batch_size, in_channels, tile, tile), np.float32))
        except Exception as exc:  # noqa: BLE001 - inductor's failures (no C++ compiler, ...) have many types
            raise WeightsError(f"torch.compile failed ({first_line(exc)[:200]}); use --backend torch") from None
        _compiled.clear()
        _compiled[key] = engine
    return _compiled[key]
