"""The device a run trains on and the process-wide settings that make it fast: device choice, autocast,
determinism, the matmul peak that utilisation figures refer to, and glibc's allocator.

glibc's malloc serves blocks of 32 MiB and more with mmap and returns them to the OS on free, so the large
activations of the Keras-size model were page-faulted and zeroed afresh every step: 27-53% more step time
for the implementations benchmarked in docs/benchmarks.md. `keep_freed_memory` makes malloc keep them:
no mmap'ed blocks and no trimming of the heap, so freed memory is reused by the next step. The process's
memory then stays at its peak (it does anyway during training). A no-op where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from perceiver.files import write_text_atomic

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # bytes of free heap top kept before trimming; mallopt takes an int


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed large blocks for reuse; True when it took both settings."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt here (%s); malloc settings left as they are", name)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """FLOP/s of the best square matmul timed for about `seconds`: the reference for utilisation figures.

    Measured rather than looked up, so it is this machine with this library and thread count; the size
    (2048 on a CPU, 8192 on a GPU) is large enough to reach the matmul kernels' plateau.
    """
    size = 8192 if device.type == "cuda" else 2048
    generator = torch.Generator(device).manual_seed(0)  # its own: timing must not move the run's random numbers
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: thread pools, kernel selection, clocks
        torch.mm(a, b, out=out)
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - began))
    return best


@contextlib.contextmanager
def objects_so_far_frozen() -> Iterator[None]:
    """Collect garbage while the block runs, but keep the objects that exist now (modules, the model, the config:
    some 400,000 long-lived ones) out of the collector's full passes; afterwards they are ordinary objects again.

    A full pass walks every tracked object: about 0.1 s here, repeated while the start-up creates them and again
    during training (docs/benchmarks.md). `train.py` turns the collector off for its start-up; this turns it on."""
    gc.freeze()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()


def processor_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model as the OS reports it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_signature(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured matmul peak depends on: the host, its processor, torch's version and threads, the dtype."""
    software = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    return f"{platform.node()} | {device} {processor_name(device)} | {software} | {dtype}"


class PeakCache:
    """Measured matmul peaks kept in a JSON file, so that a run's ~1 s timing is paid once per machine and not by
    every process (a sweep's jobs under the joblib or SLURM launchers, every later run). An unreadable file is
    measured anew and rewritten; a folder that cannot be written only means no caching."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._entries: dict[str, dict] | None = None

    def entries(self) -> dict[str, dict]:
        """The file's entries, read once (an unreadable file warns once and counts as empty)."""
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("%s is unreadable (%s); the matmul peak is timed again", self.path, error)
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, signature: str) -> float | None:
        entry = self.entries().get(signature)
        flops = entry.get("flops") if isinstance(entry, dict) else None
        return float(flops) if isinstance(flops, int | float) and flops > 0 else None

    def put(self, signature: str, flops: float) -> None:
        self._entries = self.entries() | {signature: {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}}
        try:
            write_text_atomic(self.path, json.dumps(self._entries, indent=2))
        except OSError as error:
            log.debug("the matmul peak is not cached in %s (%s)", self.path, error)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"trainer.device={name!r} is invalid: use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=auto or cpu")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: nothing for fp32, else autocast to bf16 or fp16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_determinism(enabled: bool) -> None:
    """Deterministic kernels for exact reruns (slower); TF32 matmuls otherwise on CUDA.

    Set both ways, so one job of a sweep never inherits the previous job's setting in the same process.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = not enabled
    torch.backends.cudnn.allow_tf32 = not enabled
