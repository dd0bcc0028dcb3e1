"""The C++/CUDA backend: loads the compiled kernels ``es_kernels._C``.

Where the module comes from, in order:

1. prebuilt — ``pip install`` / ``setup.py build_ext`` compiled it ahead of time (see setup.py);
2. just in time — otherwise ``csrc/`` is compiled with ninja (``torch.utils.cpp_extension.load``) into a cache
   directory on first use, once per torch version and source change, with a message saying so;
3. none — the backend is unavailable and :func:`extension_status` / :func:`unavailable_reason` say why.

Environment: ``ES_KERNELS_JIT=0`` forbids the just-in-time build; ``ES_KERNELS_FORCE_JIT=1`` ignores a prebuilt
module (to exercise the JIT path); ``ES_KERNELS_CACHE_DIR`` sets the build cache (default
``$XDG_CACHE_HOME/es_kernels`` or ``~/.cache/es_kernels``); ``MAX_JOBS`` bounds compile parallelism.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from es_kernels import _build, _checks
from es_kernels.call import OP_ARGUMENTS, BackendCapabilities, SelectCall, draw_seed

logger = logging.getLogger("es_kernels")

_lock = threading.Lock()
_module: ModuleType | None = None
_how: str | None = None  # "prebuilt" or "jit"
_reason: str | None = None  # why there is no module (None until the first attempt)
_attempted = False


# The fused op checks the losses it computed between its loss and update passes, and on CPU the input values too
# (reading a value costs no sync there); on CUDA the input checks would synchronise, so select.py keeps them.
CAPABILITIES = BackendCapabilities(input_checks_on=frozenset({"cpu"}), computed_loss_check="in_kernel")


def cache_dir() -> Path:
    """Where just-in-time builds go; one subdirectory per torch version, Python and CUDA flavour."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "es_kernels"
    base = Path(os.environ.get("ES_KERNELS_CACHE_DIR") or default)
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if _jit_with_cuda() else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return base / f"torch{torch.__version__.split('+')[0]}-{python}-{flavour}"


def _jit_with_cuda() -> bool:
    # Compiling the CUDA part just in time only pays when it can run here.
    return bool(torch.version.cuda) and torch.cuda.is_available() and _build.find_cuda_home() is not None


def _load_prebuilt() -> tuple[ModuleType | None, str | None]:
    if _build.env_flag("ES_KERNELS_FORCE_JIT"):
        return None, "prebuilt module ignored (ES_KERNELS_FORCE_JIT=1)"
    try:
        return importlib.import_module("es_kernels._C"), None
    except ModuleNotFoundError:
        return None, "es_kernels._C was not built at install time"
    except ImportError as error:  # e.g. built against another torch: undefined symbols
        return None, f"es_kernels._C failed to import ({error})"


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    with_cuda = _jit_with_cuda()
    if with_cuda and not os.environ.get("CUDA_HOME"):
        cpp_extension.CUDA_HOME = _build.find_cuda_home()
    csrc = _build.csrc_dir()
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(_build.max_jobs()))
    # torch rebuilds only what changed; announce a build only when there is no cached module to reuse.
    announce = logger.info if (directory / "es_kernels_C.so").exists() else logger.warning
    announce(
        "es_kernels: building the C++%s extension just in time into %s (first use only; a minute or two)",
        "/CUDA" if with_cuda else "",
        directory,
    )
    started = time.perf_counter()
    module = cpp_extension.load(
        name="es_kernels_C",
        sources=_build.sources(csrc, with_cuda),
        extra_include_paths=_build.include_dirs(csrc),
        extra_cflags=_build.CXX_FLAGS + ([_build.CUDA_DEFINE] if with_cuda else []),
        extra_cuda_cflags=_build.NVCC_FLAGS if with_cuda else None,
        extra_ldflags=_build.LINK_FLAGS,
        build_directory=str(directory),
        with_cuda=with_cuda,
        verbose=False,
    )
    announce("es_kernels: extension ready after %.0f s", time.perf_counter() - started)
    return module


def _first_error_line(error: Exception) -> str:
    """The compiler's first ``error:`` line if there is one (torch's message starts with the whole command)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith(("[", "c++ ", "g++ ", "nvcc ")):
            return line
    return lines[0] if lines else type(error).__name__


def _load() -> ModuleType | None:
    global _module, _how, _reason, _attempted
    if _attempted:
        return _module
    with _lock:
        if _attempted:
            return _module
        module, prebuilt_reason = _load_prebuilt()
        if module is not None:
            _module, _how = module, "prebuilt"
        elif not _build.env_flag("ES_KERNELS_JIT", default=True):
            _reason = f"{prebuilt_reason}, and the just-in-time build is switched off (ES_KERNELS_JIT=0)"
        elif not _build.csrc_dir().is_dir():
            _reason = f"{prebuilt_reason}, and csrc/ is not shipped with this install, so it cannot be built"
        else:
            try:
                _module, _how = _jit_build(), "jit"
            except Exception as error:  # compiler missing, compile error, ninja missing ...
                _reason = f"{prebuilt_reason}, and the just-in-time build failed: {_first_error_line(error)}"
                logger.warning("es_kernels: %s; using the other backends", _reason)
        if _module is not None:
            _register_fakes()
        _attempted = True
    return _module


def extension_status() -> dict[str, object]:
    """How the kernels were loaded: ``{"loaded", "how" ("prebuilt"/"jit"/None), "cuda", "reason", "path"}``.

    Calling it loads (or JIT-builds) the module if that has not happened yet.
    """
    module = _load()
    return {
        "loaded": module is not None,
        "how": _how,
        "cuda": bool(module is not None and module.built_with_cuda()),
        "reason": _reason,
        "path": getattr(module, "__file__", None),
    }


def unavailable_reason(device: torch.device) -> str | None:
    """None if the kernels can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"the extension has no kernels for {device.type} tensors"
    module = _load()
    if module is None:
        return _reason
    if device.type == "cuda":
        if not module.built_with_cuda():
            return f"es_kernels._C ({_how}) was built without its CUDA part"
        if not torch.cuda.is_available():
            return "CUDA is not available in this process"
    return None


def _require() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError(f"the es_kernels extension is unavailable: {_reason}")
    return module


def _ops():
    """``torch.ops.es_kernels_C`` once the module is loaded (its import registers the ops with the dispatcher)."""
    _require()
    return torch.ops.es_kernels_C


def fused_select(call: SelectCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend entry of ``evolved_select`` (contract in es_kernels/select.py): one dispatcher call, one kernel pass.

    ``call.check_losses`` refuses losses computed from logits that are not finite and non-negative, and
    ``call.check_inputs`` (CPU only) runs select.py's input value checks inside the call; either way the kernel
    returns a code before any write and this raises the ValueError of ``_checks.py``. The status is read only when
    a check was asked for (value checks synchronise anyway; with them off nothing here reads a device value).
    """
    seed = draw_seed(call.generator, call.indices.device)
    positions, losses, status = _ops().fused_select(
        *call.op_arguments(seed), bool(call.check_inputs), bool(call.check_losses)
    )
    if call.check_inputs or call.check_losses:
        code, value = status.tolist()
        if code != _checks.ValueCheck.OK:
            classes = call.logits.shape[1] if call.logits is not None else 0
            message = _checks.value_check_message(code, value, num_samples=call.score.numel(), num_classes=classes)
            raise ValueError(message)
    return positions, losses


def sequence_losses(call: SelectCall) -> torch.Tensor:
    """Backend entry of ``sequence_losses``: fp32 (B,) per-sequence losses, one dispatcher call
    (CPU: at::mm per vocabulary chunk and a log-sum-exp merge; CUDA: cuBLAS per chunk and two kernels)."""
    if call.hidden_states is None:
        return _ops().token_sequence_losses(
            call.logits, call.labels_a, call.ignore_index, call.sequence_reduction, call.label_smoothing
        )
    return _ops().hidden_sequence_losses(
        call.hidden_states, call.lm_head_weight, call.lm_head_bias, call.labels_a, call.ignore_index,
        call.sequence_reduction, call.label_smoothing, call.logit_scale, call.logit_softcap,
    )  # fmt: skip


def prune_select(values: torch.Tensor, keep: int, generator: torch.Generator | None) -> torch.Tensor:
    """Backend entry of ``evolved_prune``: ``keep`` ascending ids drawn without replacement ∝ values."""
    return _ops().prune_select(values, draw_seed(generator, values.device), int(keep))


# Fake (meta) implementations, beside the wrappers as torchao keeps them: shapes only, for torch.compile and
# opcheck. Registered lazily, once the library that defines the ops is loaded.
_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("es_kernels_C::fused_select")
    def _fused_select_fake(*arguments):
        named = dict(zip((*OP_ARGUMENTS, "check_inputs", "check_losses"), arguments, strict=True))
        indices, k = named["indices"], named["k"]
        return (
            indices.new_empty((k,), dtype=torch.int64),
            indices.new_empty(indices.shape, dtype=torch.float32),
            torch.empty(2, dtype=torch.int64, device="cpu"),
        )

    @torch.library.register_fake("es_kernels_C::prune_select")
    def _prune_select_fake(values, seed, keep):
        return values.new_empty((keep,), dtype=torch.int64)

    @torch.library.register_fake("es_kernels_C::token_sequence_losses")
    def _token_sequence_losses_fake(logits, targets, *options):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("es_kernels_C::hidden_sequence_losses")
    def _hidden_sequence_losses_fake(hidden_states, *arguments):
        return hidden_states.new_empty((hidden_states.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("es_kernels_C::deferred_guard")
    def _deferred_guard_fake(score, weight, indices, *arguments):
        batch = indices.shape[0]
        return (
            indices.new_empty((batch,), dtype=torch.int64),
            score.new_empty((2, batch)),
            indices.new_empty((2,), dtype=torch.int64),
        )

    @torch.library.register_fake("es_kernels_C::deferred_settle")
    def _deferred_settle_fake(*arguments):
        return None
