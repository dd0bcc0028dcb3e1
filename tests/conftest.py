"""What every test file shares: Triton's interpreter for this session, and the ``backend`` fixture.

Triton fixes interpreter or compiled mode when it is first imported, so this file imports it with
``TRITON_INTERPRET=1`` before any test module can, then restores the variable: subprocesses the tests start (the
ahead-of-time gate, console scripts) get compiled mode, and ``backend="auto"`` still sees Triton as unavailable on
CPU. The ``backend`` fixture sets the variable again only while a Triton test runs.

A test that takes ``backend`` runs once per backend: the pure-PyTorch reference, the C++ extension and the Triton
kernels under the interpreter. One that cannot run here skips with its reason, except the extension under
``ES_KERNELS_REQUIRE_EXTENSION=1`` (CI), where its absence fails the run instead.

Tiers (markers in pyproject.toml): ``python3 -m pytest`` deselects ``slow``; ``-m "slow or not slow"`` runs every
test, as CI does. A large grid keeps representative cases in the fast tier and marks the rest ``slow``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import pytest
import torch
from helpers import extension_unavailable_reason


def _import_triton_interpreted() -> str | None:
    """Import triton in interpreter mode; None if that worked, else why the Triton backend cannot run here."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if "triton" not in sys.modules:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            # gluon otherwise imports lazily at the first launch and asserts the mode from the (restored) variable.
            import triton.experimental.gluon  # noqa: F401
        except Exception as error:  # a broken install skips the Triton tests with its reason, not the whole session
            return f"importing triton failed: {error!r}"
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
    # es_kernels imports triton: only now that the mode is chosen.
    from es_kernels.triton import _interpreter_active
    from es_kernels.triton.availability import _installed_triton_version, triton_version_problem

    version = _installed_triton_version()
    if version is not None and (problem := triton_version_problem(version)):
        return problem
    if not _interpreter_active():
        return "triton was imported in compiled mode before tests/conftest.py could choose the interpreter"
    return None


TRITON_REASON = _import_triton_interpreted()

from es_kernels import EvolvedState, evolved_prune, evolved_select  # noqa: E402  (after triton chose its mode)


@dataclasses.dataclass(frozen=True)
class BackendUnderTest:
    """One backend as the tests call it: ``evolved_select``/``evolved_prune`` with ``backend=name``.

    ``law_draws`` is how many fused calls a law test may make: thousands where a call costs microseconds, a few
    hundred under the interpreter (about 0.1 s a call).
    """

    name: str
    law_draws: int

    @property
    def interpreted(self) -> bool:
        return self.name == "triton"

    def select(self, state: EvolvedState, indices: torch.Tensor, k: int, **kwargs):
        return evolved_select(state, indices, k, backend=self.name, **kwargs)

    def prune(self, state: EvolvedState, keep: int, **kwargs):
        return evolved_prune(state, keep, backend=self.name, **kwargs)


LAW_DRAWS = {"torch": 20_000, "extension": 20_000, "triton": 300}


def backend_unavailable_reason(name: str) -> str | None:
    if name == "extension":
        return extension_unavailable_reason("cpu")
    if name == "triton":
        return TRITON_REASON
    return None


def pytest_collection_modifyitems(items) -> None:
    # test_distributed's checks read the results of one 2-rank launch (a module fixture): they are multi-process
    # tests although none starts the processes itself.
    for item in items:
        if "distributed_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.multiprocess)


@pytest.fixture(params=list(LAW_DRAWS))
def backend(request, monkeypatch) -> BackendUnderTest:
    reason = backend_unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return BackendUnderTest(request.param, LAW_DRAWS[request.param])


@pytest.fixture
def triton_interpreter(monkeypatch) -> None:
    """For tests of the Triton kernels themselves: skips with the reason where they cannot run, else sets
    ``TRITON_INTERPRET=1`` for the test so the backend accepts CPU tensors."""
    if TRITON_REASON is not None:
        pytest.skip(f"triton backend unavailable: {TRITON_REASON}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
