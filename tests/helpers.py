"""Test-only helpers. What correct means (tolerances, exact laws) lives in ``es_kernels.testing``, shared with
``python -m es_kernels.selfcheck``."""

from __future__ import annotations

import torch


def extension_unavailable_reason(device: str = "cpu") -> str | None:
    """Why the C++ extension cannot run on ``device`` (None if it can). With ES_KERNELS_REQUIRE_EXTENSION=1 (CI)
    an unavailable extension is an error, so its tests cannot be skipped silently."""
    from es_kernels._build import env_flag
    from es_kernels.extension import unavailable_reason

    reason = unavailable_reason(torch.device(device))
    if reason is not None and env_flag("ES_KERNELS_REQUIRE_EXTENSION"):
        raise RuntimeError(f"ES_KERNELS_REQUIRE_EXTENSION=1 but the extension is unavailable: {reason}")
    return reason
