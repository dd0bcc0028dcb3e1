"""Build entry point: the pure-Python package always installs; es_kernels._C is compiled ahead of time when it can be.

Ahead-of-time build needs torch in the *build* environment, so install with

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

(pyproject.toml's isolated build env has no torch; under build isolation the extension is skipped with a note and
es_kernels compiles it just in time on first use instead.)

Environment switches:
    ES_KERNELS_NO_EXTENSION=1       skip the extension entirely (pure-Python install)
    ES_KERNELS_REQUIRE_EXTENSION=1  fail instead of skipping when torch or a C++ compiler is missing or the C++
                                    compile fails (CI)
    ES_KERNELS_BUILD_CUDA=auto|1|0  CUDA part: when a CUDA torch and a toolkit that compiles exist (default) /
                                    required, a CUDA compile error fails the install (CI) / never
    TORCH_CUDA_ARCH_LIST            GPU targets, default "8.0;9.0" (sm_80, sm_90); a GPU is not needed to build
    CUDA_HOME                       the toolkit; found from nvcc (through wrappers) or /usr/local/cuda* if unset
    MAX_JOBS                        parallel compile jobs; default bounded by cores and available memory

The package installs whenever it can: under the default ES_KERNELS_BUILD_CUDA=auto a toolkit that cannot compile
(e.g. CUDA_HOME=/usr/local, torch's guess for an nvcc wrapper in /usr/local/bin, which has no CUDA headers) is
found by a probe before the build and the CPU extension is built instead; a CUDA compile error during the build
falls back the same way, and a failed C++ compile to the pure-Python package (compiled just in time on first use).
Each fallback prints one line saying why. Only ES_KERNELS_BUILD_CUDA=1 and ES_KERNELS_REQUIRE_EXTENSION=1 make
these failures fail the install.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    # By file path: importing the es_kernels package here would import torch-dependent modules.
    spec = importlib.util.spec_from_file_location("_es_kernels_build", ROOT / "es_kernels" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _note(message: str) -> None:
    print(f"es_kernels setup: {message}", file=sys.stderr)


def _skip(reason: str) -> dict:
    if _load_build_config().env_flag("ES_KERNELS_REQUIRE_EXTENSION"):
        raise RuntimeError(f"es_kernels: cannot build the extension ({reason}) and ES_KERNELS_REQUIRE_EXTENSION=1")
    _note(f"building without es_kernels._C ({reason}); it will be compiled just in time on first use")
    return {}


# The header the CUDA sources include first; its absence is the commonest broken toolkit (CUDA_HOME=/usr/local).
_CUDA_HEADER = "cuda_runtime_api.h"
_PROBE_SOURCE = f"#include <{_CUDA_HEADER}>\n__global__ void probe(float* x) {{ x[threadIdx.x] = 0.f; }}\n"
# What a failed compile raises: distutils' CompileError/LinkError, or torch's ninja path (RuntimeError).
_BUILD_ERRORS = (RuntimeError, OSError, subprocess.CalledProcessError)
try:
    from setuptools.errors import CompileError, LinkError

    _BUILD_ERRORS += (CompileError, LinkError)
except ImportError:  # setuptools older than 59
    pass


def cuda_mode() -> str:
    mode = os.environ.get("ES_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"ES_KERNELS_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    return mode


def probe_cuda_toolkit(cuda_home: str) -> str | None:
    """Why the toolkit at ``cuda_home`` cannot compile the CUDA sources, or None when it can: the runtime header and
    nvcc must be there, and nvcc must compile a tiny kernel including that header (seconds)."""
    header = Path(cuda_home) / "include" / _CUDA_HEADER
    if not header.is_file():
        return f"CUDA_HOME={cuda_home} has no include/{_CUDA_HEADER}"
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    if not os.access(nvcc, os.X_OK):
        return f"CUDA_HOME={cuda_home} has no bin/nvcc"
    with tempfile.TemporaryDirectory(prefix="es_kernels_probe_") as folder:
        source = Path(folder) / "probe.cu"
        source.write_text(_PROBE_SOURCE)
        try:
            done = subprocess.run(
                [str(nvcc), "-c", str(source), "-o", str(Path(folder) / "probe.o")],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{nvcc} did not run ({error})"
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()
        return f"{nvcc} cannot compile a test kernel ({last[-1] if last else f'exit status {done.returncode}'})"
    return None


def choose_cuda(cuda_home: str | None, torch_cuda: str | None) -> tuple[str | None, str | None]:
    """(the toolkit to build the CUDA part with, or None and the reason there is none) for the toolkit found at
    ``cuda_home`` and torch's CUDA version. ES_KERNELS_BUILD_CUDA=1 turns every reason into an error; under auto
    the reason is printed and the CPU extension is built."""
    mode = cuda_mode()
    if mode == "0":
        return None, "ES_KERNELS_BUILD_CUDA=0"
    if cuda_home is None:
        reason = "no CUDA toolkit (nvcc) found"
    elif torch_cuda is None:
        reason = "torch is a CPU-only build"
    else:
        reason = probe_cuda_toolkit(cuda_home)
    if reason is None:
        return cuda_home, None
    if mode == "1":
        raise RuntimeError(f"es_kernels: ES_KERNELS_BUILD_CUDA=1 but {reason}")
    return None, reason


def make_extension(build, cuda_home: str | None):
    """es_kernels._C with its CUDA part when ``cuda_home`` is given, else for the CPU only."""
    from torch.utils import cpp_extension

    csrc = build.csrc_dir(ROOT)
    sources = [os.path.relpath(path, ROOT) for path in build.sources(csrc, cuda_home is not None)]
    include_dirs = build.include_dirs(csrc)  # absolute: the compiler may run from a temporary build directory
    if cuda_home is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
        _note(f"building es_kernels._C with CUDA ({cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
        return cpp_extension.CUDAExtension(
            "es_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": [*build.CXX_FLAGS, build.CUDA_DEFINE], "nvcc": build.NVCC_FLAGS},
            extra_link_args=build.LINK_FLAGS,
        )
    return cpp_extension.CppExtension(
        "es_kernels._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": build.CXX_FLAGS},
        extra_link_args=build.LINK_FLAGS,
    )


def is_cuda_extension(extension) -> bool:
    return any(str(source).endswith(".cu") for source in extension.sources)


def fallback_extension(build, extension, error: BaseException):
    """What to build after ``extension`` failed to compile with ``error``: the CPU extension after a CUDA failure
    under ES_KERNELS_BUILD_CUDA=auto, nothing (pure Python, compiled just in time later) after a C++ failure unless
    ES_KERNELS_REQUIRE_EXTENSION=1. Re-raises ``error`` when the settings make it fatal."""
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    if is_cuda_extension(extension):
        if cuda_mode() == "1":
            raise error
        _note(
            f"the CUDA part of es_kernels._C failed to compile ({reason}); building it for CPU only instead "
            "(ES_KERNELS_BUILD_CUDA=1 makes this an error)"
        )
        return make_extension(build, None)
    if build.env_flag("ES_KERNELS_REQUIRE_EXTENSION"):
        raise error
    _note(
        f"es_kernels._C failed to compile ({reason}); installing the pure-Python package, the extension will be "
        "compiled just in time on first use (ES_KERNELS_REQUIRE_EXTENSION=1 makes this an error)"
    )
    return None


def build_ext_with_fallback(build):
    """torch's BuildExtension (ninja), rebuilding per :func:`fallback_extension` when a compile fails."""
    from torch.utils import cpp_extension

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtWithFallback(base):
        def run(self):
            while True:
                try:
                    return super().run()
                except _BUILD_ERRORS as error:
                    (failed,) = self.extensions
                    replacement = fallback_extension(build, failed, error)
                    # A fresh extension object: BuildExtension adds its flags to each one it builds.
                    self.extensions = self.distribution.ext_modules = [replacement] if replacement else []
                    if replacement is None:
                        return None

    return BuildExtWithFallback


def extension_kwargs() -> dict:
    build = _load_build_config()
    if build.env_flag("ES_KERNELS_NO_EXTENSION"):
        _note("ES_KERNELS_NO_EXTENSION=1: pure-Python install")
        return {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return _skip("no C++ compiler found")
    found = build.find_cuda_home() if cuda_mode() != "0" else None
    if found and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = found  # before torch.utils.cpp_extension reads it at import
    try:
        import torch
        from torch.utils import cpp_extension  # noqa: F401  (importable: the build needs it)
    except ImportError as error:
        return _skip(f"torch is not importable in the build environment ({error}); use --no-build-isolation")

    os.environ.setdefault("MAX_JOBS", str(build.max_jobs()))
    cuda_home, reason = choose_cuda(found, torch.version.cuda)
    if cuda_home is None:
        _note(f"building es_kernels._C for CPU (no CUDA part: {reason})")
    return {
        "ext_modules": [make_extension(build, cuda_home)],
        "cmdclass": {"build_ext": build_ext_with_fallback(build)},
    }


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as es_kernels/_csrc, so an installed wheel can still compile the extension just
    in time when it was built without it (build isolation, no compiler at build time)."""

    def run(self):
        super().run()
        shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "es_kernels" / "_csrc", dirs_exist_ok=True)


def setup_kwargs() -> dict:
    kwargs = extension_kwargs()
    kwargs["cmdclass"] = {"build_py": BuildPyWithSources, **kwargs.get("cmdclass", {})}
    return kwargs


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import the functions above
    setup(**setup_kwargs())
