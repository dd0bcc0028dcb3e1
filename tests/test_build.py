"""How the package is built and loaded, as opposed to the per-property kernel tests of the other files: setup.py's
choice of the CPU or CUDA extension and its fallbacks, the status query, the sources the package ships for a
just-in-time build and that build itself, the nvcc compile of the CUDA sources, the CUDA row loss compiled for the
host with g++, and the Triton releases the Triton backend accepts. The just-in-time build and the nvcc compile are
``slow``."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import extension_unavailable_reason

import es_kernels.triton.availability as triton_backend
from es_kernels import EvolvedState, evolved_select
from es_kernels._build import env_flag

_REASON = extension_unavailable_reason("cpu")
needs_extension = pytest.mark.skipif(_REASON is not None, reason=f"extension unavailable: {_REASON}")
ROOT = Path(__file__).resolve().parent.parent


def environment() -> dict[str, str]:
    """This checkout first on the path (also for the subprocess), one thread."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------- setup.py


@pytest.fixture
def setup_module(monkeypatch):
    """setup.py's functions (it calls setup() only as __main__), with the build switches unset."""
    for name in ("ES_KERNELS_BUILD_CUDA", "ES_KERNELS_REQUIRE_EXTENSION", "ES_KERNELS_NO_EXTENSION"):
        monkeypatch.delenv(name, raising=False)
    # setup.py fills these in when unset: set here, so the test process gets its own values back afterwards
    monkeypatch.setenv("CUDA_HOME", "/nonexistent/cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setenv("MAX_JOBS", "1")
    spec = importlib.util.spec_from_file_location("es_kernels_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_toolkit_without_headers_builds_the_cpu_extension(setup_module, tmp_path, monkeypatch, capsys):
    """CUDA_HOME=/usr/local (torch's guess for an nvcc wrapper in /usr/local/bin) has nvcc but no CUDA headers."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup_module.choose_cuda(str(tmp_path), "13.0") == (
        None,
        f"CUDA_HOME={tmp_path} has no include/cuda_runtime_api.h",
    )
    kwargs = setup_module.extension_kwargs()
    if not kwargs:
        pytest.skip("no C++ compiler or torch in this environment: setup.py builds no extension at all")
    (extension,) = kwargs["ext_modules"]
    assert not setup_module.is_cuda_extension(extension) and extension.sources
    assert "cudart" not in extension.libraries
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("es_kernels setup:")]
    assert notes == [
        f"es_kernels setup: building es_kernels._C for CPU (no CUDA part: CUDA_HOME={tmp_path} has no "
        "include/cuda_runtime_api.h)"
    ]
    monkeypatch.setenv("ES_KERNELS_BUILD_CUDA", "1")  # CI: a toolkit that cannot compile fails the install
    with pytest.raises(RuntimeError, match=r"ES_KERNELS_BUILD_CUDA=1 but CUDA_HOME=.* has no include/cuda_runtime"):
        setup_module.choose_cuda(str(tmp_path), "13.0")


def test_a_toolkit_whose_nvcc_fails_builds_the_cpu_extension(setup_module, tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\necho 'nvcc fatal : Unsupported gpu architecture' >&2\nexit 1\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    cuda_home, reason = setup_module.choose_cuda(str(tmp_path), "13.0")
    assert cuda_home is None and reason.endswith(
        "cannot compile a test kernel (nvcc fatal : Unsupported gpu architecture)"
    )
    assert setup_module.choose_cuda(None, "13.0") == (None, "no CUDA toolkit (nvcc) found")
    assert setup_module.choose_cuda(str(tmp_path), None) == (None, "torch is a CPU-only build")


def test_a_failed_compile_falls_back_unless_required(setup_module, monkeypatch, capsys):
    pytest.importorskip("torch.utils.cpp_extension")
    build = setup_module._load_build_config()
    cuda = setup_module.make_extension(build, "/nonexistent/cuda")
    cpu = setup_module.make_extension(build, None)
    error = RuntimeError("Error compiling objects for extension")
    fallback = setup_module.fallback_extension(build, cuda, error)
    assert not setup_module.is_cuda_extension(fallback) and fallback.sources == cpu.sources
    assert "building it for CPU only instead" in capsys.readouterr().err
    assert setup_module.fallback_extension(build, cpu, error) is None  # pure Python; JIT on first use
    assert "installing the pure-Python package" in capsys.readouterr().err
    monkeypatch.setenv("ES_KERNELS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="Error compiling"):
        setup_module.fallback_extension(build, cuda, error)
    monkeypatch.setenv("ES_KERNELS_REQUIRE_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="Error compiling"):
        setup_module.fallback_extension(build, cpu, error)


def test_setup_py_chooses_the_cpu_extension_from_the_command_line(tmp_path):
    """The real entry path, without compiling: `setup.py --version` computes the extension choice first."""
    pytest.importorskip("torch.utils.cpp_extension")
    env = {**environment(), "CUDA_HOME": str(tmp_path), "ES_KERNELS_BUILD_CUDA": "auto"}
    for name in ("ES_KERNELS_REQUIRE_EXTENSION", "ES_KERNELS_NO_EXTENSION"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "setup.py", "--version"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"no CUDA part: CUDA_HOME={tmp_path} has no include/cuda_runtime_api.h" in done.stderr
    env["ES_KERNELS_BUILD_CUDA"] = "1"
    failed = subprocess.run(
        [sys.executable, "setup.py", "--version"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert failed.returncode != 0 and "ES_KERNELS_BUILD_CUDA=1 but" in failed.stderr


def test_build_ext_rebuilds_for_cpu_then_gives_up_to_pure_python(setup_module, monkeypatch, capsys):
    """The build command's loop, with the compile stubbed: CUDA fails -> CPU build; CPU fails too -> no extension."""
    pytest.importorskip("torch.utils.cpp_extension")
    from setuptools import Distribution

    build = setup_module._load_build_config()
    command_class = setup_module.build_ext_with_fallback(build)
    built: list[bool] = []

    def compile_stub(self, fail_cpu: bool):
        (extension,) = self.extensions
        built.append(setup_module.is_cuda_extension(extension))
        if built[-1] or fail_cpu:
            raise RuntimeError("Error compiling objects for extension")

    for fail_cpu in (False, True):
        built.clear()
        distribution = Distribution({"ext_modules": [setup_module.make_extension(build, "/nonexistent/cuda")]})
        command = command_class(distribution)
        command.ensure_finalized()
        monkeypatch.setattr(command_class.__mro__[1], "run", lambda self, f=fail_cpu: compile_stub(self, f))
        command.run()
        assert built == [True, False]
        if fail_cpu:
            assert command.extensions == distribution.ext_modules == []
        else:
            (extension,) = command.extensions
            assert not setup_module.is_cuda_extension(extension) and distribution.ext_modules == [extension]
    notes = [line for line in capsys.readouterr().err.splitlines() if "failed to compile" in line]
    assert len(notes) == 3  # one line per fallback


# ----------------------------------------------------------------------------------------- loading, just-in-time build


def test_status_query_says_how_the_module_was_loaded():
    from es_kernels import backend_status, extension

    status = extension.extension_status()
    assert set(status) == {"loaded", "how", "cuda", "reason", "path"}
    if status["loaded"]:
        assert status["how"] in ("prebuilt", "jit") and status["reason"] is None
        assert backend_status("cpu")["extension"] == "available"
    else:
        assert status["how"] is None and status["reason"]
        assert backend_status("cpu")["extension"] == status["reason"]


def test_installed_package_carries_the_sources_for_a_just_in_time_build(tmp_path):
    """A wheel built without the extension (build isolation, no compiler) must still be able to compile it on first
    use, so the package ships csrc/ as es_kernels/_csrc and the loader finds it there outside a checkout."""
    from es_kernels import _build

    environment = {**os.environ, "ES_KERNELS_NO_EXTENSION": "1"}
    command = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = tmp_path / "es_kernels" / "_csrc"
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*.c*")) == sorted(
        p.relative_to(ROOT / "csrc") for p in (ROOT / "csrc").rglob("*.c*")
    )
    assert _build.sources(shipped, with_cuda=True)
    # The installed layout: es_kernels/_build.py with _csrc beside it and no csrc/ next to the package.
    installed = tmp_path / "es_kernels" / "_build.py"
    shutil.copy(ROOT / "es_kernels" / "_build.py", installed)
    probe = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from es_kernels import _build; print(_build.csrc_dir())"
    )
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert Path(found.stdout.strip()) == shipped, found.stderr


def test_jit_switched_off_reports_why(tmp_path):
    script = (
        "from es_kernels import extension, backend_status;"
        "s = extension.extension_status(); print(s['loaded'], '|', s['reason']);"
        "print(backend_status('cpu')['extension'])"
    )
    env = dict(os.environ, ES_KERNELS_FORCE_JIT="1", ES_KERNELS_JIT="0", ES_KERNELS_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("False |") and "ES_KERNELS_JIT=0" in out and "ES_KERNELS_FORCE_JIT=1" in out


@pytest.mark.slow
@pytest.mark.compile
@needs_extension
def test_jit_build_matches_the_loaded_module(tmp_path):
    """Builds csrc/ just in time (ninja) into an empty cache, once, and draws exactly what the loaded module draws
    for the same seed. A few minutes on 2 cores."""
    script = """
import torch
from es_kernels import EvolvedState, evolved_select, extension
status = extension.extension_status()
assert status["how"] == "jit", status
state = EvolvedState(1000)
chosen = evolved_select(state, torch.arange(0, 1000, 7), 30, logits=torch.ones(143, 9).cumsum(1).sin(),
                        targets=torch.arange(143) % 9, generator=torch.Generator().manual_seed(11), backend="extension")
print(chosen.tolist())
"""
    env = dict(os.environ, ES_KERNELS_FORCE_JIT="1", ES_KERNELS_CACHE_DIR=str(tmp_path), MAX_JOBS="2")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "building the C++" in result.stderr  # the one clear message
    state = EvolvedState(1000)
    expected = evolved_select(
        state, torch.arange(0, 1000, 7), 30, logits=torch.ones(143, 9).cumsum(1).sin(),
        targets=torch.arange(143) % 9, generator=torch.Generator().manual_seed(11), backend="extension",
    )  # fmt: skip
    assert result.stdout.strip() == str(expected.tolist())


# ----------------------------------------------------------------------------------------- nvcc


def _nvcc() -> str | None:
    from es_kernels import _build

    home = _build.find_cuda_home()
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(source):
    """Device code and launchers compile for sm_80 and sm_90 (no GPU needed); warnings in our code are errors."""
    nvcc = _nvcc()
    if nvcc is None:
        if env_flag("ES_KERNELS_REQUIRE_CUDA"):
            pytest.fail("nvcc not found and ES_KERNELS_REQUIRE_CUDA=1")
        pytest.skip("nvcc not found")
    from es_kernels import _build

    command = [
        nvcc, "-std=c++17", *_build.NVCC_FLAGS, f"-I{ROOT / 'csrc'}", "-Werror", "all-warnings",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-c", str(ROOT / "csrc" / "cuda" / source), "-o", os.devnull,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]


# The loss kernels read the logits with 16-byte vector loads (what bandwidth at large B x C needs) and keep every
# variable in registers: read from the sm_90 PTX and ptxas' report, as the Triton gate does for its kernels.
VECTOR_LOADS = {
    "fused_select.cu": ("row_partial_kernel", "loss_row_kernel"),
    "sequence_loss.cu": ("sequence_rows_kernel",),
}


def _ptx_entries(ptx: str) -> dict[str, str]:
    """Kernel (mangled) name -> its PTX body."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry (\S+)\(", ptx)]
    return {name: ptx[start : (starts[i + 1][0] if i + 1 < len(starts) else len(ptx))]
            for i, (start, name) in enumerate(starts)}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(VECTOR_LOADS))
def test_cuda_loss_kernels_use_vector_loads_and_do_not_spill(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    from es_kernels import _build

    common = [nvcc, "-std=c++17", *_build.NVCC_FLAGS, f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "cuda" / source)]
    ptx = tmp_path / "out.ptx"
    result = subprocess.run([*common, "-arch=sm_90", "-ptx", "-o", str(ptx)], capture_output=True, text=True,
                            timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    entries = _ptx_entries(ptx.read_text())
    for kernel in VECTOR_LOADS[source]:
        # Soft-target variants read a second row of another alignment one column at a time: only the others count.
        variants = {name: body for name, body in entries.items() if kernel in name}
        assert variants, f"no {kernel} in the PTX"
        vectorised = [name for name, body in variants.items() if "ld.global.nc.v4" in body]
        assert len(vectorised) >= len(variants) // 2, f"{kernel}: no 16-byte loads in {sorted(variants)}"
    result = subprocess.run([*common, "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v", "-c", "-o",
                             str(tmp_path / "out.o")], capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    spills = re.findall(r"Function properties for (\S+)\n\s+\d+ bytes stack frame, (\d+) bytes spill stores",
                        result.stderr)  # fmt: skip
    assert spills, result.stderr[-2000:]
    assert [name for name, stores in spills if int(stores) > 0] == []


# ----------------------------------------------------------------------------------------- CUDA row loss on the host

# The CUDA extension's row loss, compiled for the host with g++ and run with the kernel's exact column schedule
# (vector groups after a scalar head to the 16-byte boundary, column splits merged in order) and shuffle tree
# (tests/cuda_row_loss_host.cpp), against fp64 at large common offsets of the logits. Sums of x and
# t * x taken plainly and shifted by the max only at the end lose everything to cancellation at an offset of 1e4
# (relative error ~2e-4); kept relative to the running max they stay within 2e-6.

KIND = {"hard": 1, "soft": 2, "mixup": 3}


@pytest.fixture(scope="module")
def host_row_loss(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no C++ compiler to build the host copy of the CUDA row loss (CI must have one)")
        pytest.skip("no C++ compiler")
    library = tmp_path_factory.mktemp("row_loss") / "row_loss.so"
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-I", str(ROOT / "csrc"),
               str(ROOT / "tests" / "cuda_row_loss_host.cpp"), "-o", str(library)]  # fmt: skip
    subprocess.run(command, check=True)
    return ctypes.CDLL(str(library))


def _pointer(array):
    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


def run(library, logits, kind, smoothing, soft=None, labels=None, labels_b=None, lam=1.0, chunk=0):
    """The CUDA row loss replayed on the host; ``chunk`` > 0 reads each row as column splits of that width."""
    batch, classes = logits.shape
    out = np.empty(batch, np.float32)
    library.row_losses.restype = None
    library.row_losses(_pointer(logits), _pointer(soft), _pointer(labels), _pointer(labels_b), ctypes.c_int64(batch),
                       ctypes.c_int64(classes), ctypes.c_int32(KIND[kind]), ctypes.c_float(smoothing),
                       ctypes.c_float(lam), ctypes.c_int64(chunk), _pointer(out))  # fmt: skip
    return out


def fp64_losses(logits, smoothing, soft=None, labels=None, labels_b=None, lam=1.0):
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    lse = (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]
    smooth = lse - x.mean(axis=1)
    if soft is not None:
        t = soft.astype(np.float64)
        nll = (t * (lse[:, None] - x)).sum(axis=1)
    else:
        rows = np.arange(len(x))
        nll = lse - x[rows, labels]
        if labels_b is not None:
            nll = lam * nll + (1 - lam) * (lse - x[rows, labels_b])
    return (1 - smoothing) * nll + smoothing * smooth


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
@pytest.mark.parametrize("classes", [1000, 4099])
@pytest.mark.parametrize("kind", ["soft", "hard", "mixup"])
@pytest.mark.parametrize("chunk", [0, 1040])
def test_row_loss_is_accurate_at_large_common_offsets(host_row_loss, offset, classes, kind, chunk):
    """Rows of 4099 fp32 columns start at every alignment mod 16 bytes across the batch, so the
    scalar head, the vector groups and the tail all run; chunk=1040 adds the merge of column splits."""
    rng = np.random.default_rng(classes)
    batch, smoothing = 8, 0.1
    logits = (offset + 3 * rng.standard_normal((batch, classes))).astype(np.float32)
    given = {}
    if kind == "soft":
        given["soft"] = rng.dirichlet(np.full(classes, 0.5), size=batch).astype(np.float32)
    else:
        given["labels"] = rng.integers(0, classes, batch)
        if kind == "mixup":
            given.update(labels_b=rng.integers(0, classes, batch), lam=0.3)
    got = run(host_row_loss, logits, kind, smoothing, chunk=chunk, **given)
    expected = fp64_losses(logits, smoothing, **given)
    assert np.max(np.abs(got - expected) / np.abs(expected)) <= 2e-6


@pytest.mark.parametrize("batch", [1, 2, 7, 300, 1024, 4096])
def test_one_block_top_k_matches_a_stable_sort(host_row_loss, batch):
    """The bitonic network of the one-block select (kernels/top_k.cuh) picks the k smallest complemented keys with
    equal keys to the lower position, as the stable radix sort of the large-batch schedule does; positions come
    back ascending. Keys are drawn from a few values so ties are common."""
    rng = np.random.default_rng(batch)
    keys = rng.integers(0, 5, batch).astype(np.uint64) * np.uint64(2**40) + np.uint64(0x8000000000000000)
    function = host_row_loss.top_k_positions
    function.restype = None
    for k in sorted({1, max(1, batch // 3), batch}):
        out = np.full(k, -1, np.int64)
        function(_pointer(keys), ctypes.c_int32(batch), ctypes.c_int32(k), _pointer(out))
        expected = np.sort(np.argsort(keys, kind="stable")[:k])
        assert np.array_equal(out, expected), (batch, k)


def test_row_loss_special_values(host_row_loss):
    logits = np.zeros((3, 300), np.float32)
    logits[0, 7] = np.nan
    logits[1, 5] = np.inf
    logits[2, :] = -np.inf
    labels = np.zeros(3, np.int64)
    assert np.isnan(run(host_row_loss, logits, "hard", 0.1, labels=labels)).all()
    bad_label = run(host_row_loss, np.zeros((1, 300), np.float32), "hard", 0.0, labels=np.array([300]))
    assert np.isnan(bad_label).all()
    # Some -inf logits are fine: the loss is that of the finite ones (and +inf under smoothing, as in fp64).
    partly = np.log(np.full((1, 300), 1 / 299, np.float32))
    partly[0, 0] = -np.inf
    assert run(host_row_loss, partly, "hard", 0.0, labels=np.array([1]))[0] == pytest.approx(np.log(299), rel=1e-6)


# ----------------------------------------------------------------------------------------- Triton releases

# The Triton backend refuses Triton releases that cannot compile its kernels, with the reason, so ``auto`` falls
# back instead of failing on every call.


@pytest.mark.parametrize("version", ["3.0.0", "3.1.0", "3.3.1", "3.3.1+git35c6c7c6", "2.3.0"])
def test_old_triton_is_refused_with_a_reason(monkeypatch, version):
    monkeypatch.setattr(triton_backend, "_installed_triton_version", lambda: version)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and ">= 3.4" in reason and version in reason


@pytest.mark.parametrize("version", ["3.4.0", "3.5.1+gitabc", "3.10.0", "4.0.0"])
def test_supported_triton_versions_pass_the_version_test(version):
    assert triton_backend.triton_version_problem(version) is None


def test_unreadable_version_is_refused():
    assert "cannot read" in triton_backend.triton_version_problem("nightly")


def test_named_triton_backend_says_why_when_triton_is_too_old(monkeypatch):
    from es_kernels import backends

    monkeypatch.setattr(triton_backend, "_installed_triton_version", lambda: "3.2.0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_availability", {})  # decided once per process: this test fakes an install
    with pytest.raises(backends.BackendUnavailableError, match=r"triton >= 3\.4.*found 3\.2\.0"):
        backends.resolve_backend("triton", torch.device("cpu"))


def test_every_source_gets_an_object_file_of_its_own():
    """The just-in-time build (torch.utils.cpp_extension.load) names each object by its file name alone, so
    csrc/x.cpp and csrc/cpu/x.cpp would both become x.o and ninja refuses the build (a CUDA file becomes x.cuda.o)."""
    from es_kernels import _build

    objects = [
        Path(source).stem + (".cuda.o" if source.endswith(".cu") else ".o")
        for source in _build.sources(_build.csrc_dir(), with_cuda=True)
    ]
    assert len(objects) == len(set(objects)), sorted(o for o in objects if objects.count(o) > 1)
