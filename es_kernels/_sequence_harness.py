"""Temporary: a pybind11 build of the C++ sequence-loss entry points (``csrc/sequence_loss.h``) for tests and the
benchmark, until they are registered with the dispatcher through the call-object contract (issue 10). Delete this
module and ``csrc/testing/`` then."""

from __future__ import annotations

from pathlib import Path


def load_sequence_harness():
    """Compile (about two minutes the first time, cached by torch after) and import the harness module."""
    from torch.utils.cpp_extension import load

    from es_kernels import _build

    csrc = Path(_build.csrc_dir())
    return load(
        "es_sequence_harness",
        [str(csrc / "testing" / "sequence_harness.cpp"), str(csrc / "cpu" / "sequence_loss.cpp")],
        extra_include_paths=[str(csrc)],
        extra_cflags=_build.CXX_FLAGS,
    )
