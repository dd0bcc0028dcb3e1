"""Build entry point: the pure-Python package always installs; es_kernels._C is compiled ahead of time when it can be.

Ahead-of-time build needs torch in the *build* environment, so install with

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

(pyproject.toml's isolated build env has no torch; under build isolation the extension is skipped with a note and
es_kernels compiles it just in time on first use instead.)

Environment switches:
    ES_KERNELS_NO_EXTENSION=1       skip the extension entirely (pure-Python install)
    ES_KERNELS_REQUIRE_EXTENSION=1  fail instead of skipping when torch or a C++ compiler is missing (CI)
    ES_KERNELS_BUILD_CUDA=auto|1|0  CUDA part: when nvcc and a CUDA torch exist (default) / required / never
    TORCH_CUDA_ARCH_LIST            GPU targets, default "8.0;9.0" (sm_80, sm_90); a GPU is not needed to build
    CUDA_HOME                       the toolkit; found from nvcc (through wrappers) or /usr/local/cuda* if unset
    MAX_JOBS                        parallel compile jobs; default bounded by cores and available memory
A compile error always fails the build.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
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


def extension_kwargs() -> dict:
    build = _load_build_config()
    if build.env_flag("ES_KERNELS_NO_EXTENSION"):
        _note("ES_KERNELS_NO_EXTENSION=1: pure-Python install")
        return {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return _skip("no C++ compiler found")
    cuda_mode = os.environ.get("ES_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if cuda_mode not in ("auto", "1", "0"):
        raise ValueError(f"ES_KERNELS_BUILD_CUDA must be auto, 1 or 0, got {cuda_mode!r}")
    cuda_home = build.find_cuda_home() if cuda_mode != "0" else None
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        return _skip(f"torch is not importable in the build environment ({error}); use --no-build-isolation")

    with_cuda = cuda_home is not None and torch.version.cuda is not None
    if cuda_mode == "1" and not with_cuda:
        why = "no CUDA toolkit (nvcc) found" if cuda_home is None else "torch is a CPU-only build"
        raise RuntimeError(f"es_kernels: ES_KERNELS_BUILD_CUDA=1 but {why}")
    os.environ.setdefault("MAX_JOBS", str(build.max_jobs()))
    csrc = build.csrc_dir(ROOT)
    sources = [os.path.relpath(path, ROOT) for path in build.sources(csrc, with_cuda)]
    include_dirs = build.include_dirs(csrc)  # absolute: the compiler may run from a temporary build directory
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
        _note(f"building es_kernels._C with CUDA ({cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
        extension = cpp_extension.CUDAExtension(
            "es_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": [*build.CXX_FLAGS, build.CUDA_DEFINE], "nvcc": build.NVCC_FLAGS},
            extra_link_args=build.LINK_FLAGS,
        )
    else:
        _note("building es_kernels._C for CPU (no CUDA part)")
        extension = cpp_extension.CppExtension(
            "es_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": build.CXX_FLAGS},
            extra_link_args=build.LINK_FLAGS,
        )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
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


setup(**setup_kwargs())
