"""How es_kernels._C is compiled: sources, flags, CUDA discovery, job count, and the one reader of boolean
environment variables. Shared by setup.py (ahead of time) and es_kernels/extension.py (just in time). Imports nothing
from es_kernels, so setup.py can load it by file path.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path

_TRUE = frozenset({"1", "true", "yes", "on", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "n"})


def env_flag(name: str, default: bool | None = False) -> bool | None:
    """A boolean environment switch, read now: 1/true/yes/on/y or 0/false/no/off/n in any case; ``default`` when
    unset or empty. Any other value raises, naming the variable (a typo must not silently mean "off")."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be one of 1/true/yes/on or 0/false/no/off, got {os.environ[name]!r}")


# Default GPU targets when TORCH_CUDA_ARCH_LIST is unset: A100 (sm_80) and H100 (sm_90). Without a GPU torch would
# otherwise target every architecture it knows, which multiplies the nvcc time.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# -g0 overrides the -g that Python's own CFLAGS add: debug info of torch headers triples compile time and .so size.
# Strict IEEE fp32 products and sums: the state update must equal reference/update.py bit for bit, so the compilers
# must not contract a*b + c into a fused multiply-add.
CXX_FLAGS = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-DES_KERNELS_WITH_CUDA", "-Xcompiler", "-ffp-contract=off"]
LINK_FLAGS = ["-fopenmp"]
CUDA_DEFINE = "-DES_KERNELS_WITH_CUDA"

# Rough peak resident memory of one compiler process on these sources (g++ with torch headers, nvcc per arch).
_GIB_PER_JOB = 2.0


def csrc_dir(root: str | os.PathLike | None = None) -> Path:
    """The C++/CUDA sources: ``root/csrc``; else ``csrc/`` next to the package (a checkout or editable install),
    else the copy an installed wheel ships (``es_kernels/_csrc``)."""
    if root is not None:
        return Path(root) / "csrc"
    package = Path(__file__).resolve().parent
    checkout = package.parent / "csrc"
    return checkout if (checkout / "bindings.cpp").is_file() else package / "_csrc"


def sources(csrc: Path, with_cuda: bool) -> list[str]:
    """Every translation unit, relative paths sorted for reproducible builds; CUDA files only with CUDA."""
    found = sorted(glob.glob(str(csrc / "*.cpp")) + glob.glob(str(csrc / "cpu" / "*.cpp")))
    if with_cuda:
        found += sorted(glob.glob(str(csrc / "cuda" / "*.cu")) + glob.glob(str(csrc / "cuda" / "*.cpp")))
    return found


def include_dirs(csrc: Path) -> list[str]:
    return [str(csrc)]


def find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the toolkit that owns the nvcc on PATH.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc is a wrapper script (e.g. /usr/local/bin);
    this follows symlinks and, failing that, looks for /usr/local/cuda* holding both nvcc and the runtime headers.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]

    def is_toolkit(path: str) -> bool:
        return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
            os.path.join(path, "include", "cuda_runtime.h")
        )

    nvcc = shutil.which("nvcc")
    if nvcc:
        candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if is_toolkit(candidate):
            return candidate
    candidates = [p for p in glob.glob("/usr/local/cuda*") if is_toolkit(p)]

    def version(path: str) -> tuple[int, ...]:
        match = re.search(r"(\d+)\.(\d+)$", path)
        return tuple(int(x) for x in match.groups()) if match else (0, 0)

    try:
        import torch

        wanted = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    except ImportError:
        wanted = None
    exact = [p for p in candidates if wanted and version(p) == wanted]
    if exact:
        return exact[0]
    if "/usr/local/cuda" in candidates:
        return "/usr/local/cuda"
    return max(candidates, key=version) if candidates else None


def max_jobs() -> int:
    """Parallel compile jobs bounded by cores and by available memory (MAX_JOBS wins if set)."""
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    available_gib = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available_gib = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    by_memory = int(available_gib // _GIB_PER_JOB) if available_gib is not None else cores
    return max(1, min(cores, by_memory))
