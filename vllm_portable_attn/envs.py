"""Every environment variable vllm_portable_attn reads, parsed and validated in one place.

Names deliberately avoid the ``VLLM_`` prefix: vLLM's ``envs.validate_environ`` warns about (or,
with ``fail_on_environ_validation``, rejects) any ``VLLM_*`` variable it does not know.

Values are parsed once per process and cached; tests that change the environment call
:func:`reset_cache` afterwards.
"""

from __future__ import annotations

import functools
import os
from typing import Literal, get_args

Route = Literal["unified", "grouped"]
"""A resolved kernel route: ``unified`` runs the whole mixed batch in one launch; ``grouped``
runs decodes, extends and prefills through per-role kernels."""

RouteSetting = Literal["auto", "unified", "grouped"]

ROUTE_ENV = "PORTABLE_ATTN_ROUTE"

#: Every variable we read, with its default and meaning (the README's table mirrors this).
ENV_VARS: dict[str, tuple[str, str]] = {
    ROUTE_ENV: (
        "auto",
        "Kernel route: 'auto' (grouped on ROCm, unified elsewhere), 'unified' or 'grouped'.",
    ),
}


def _is_rocm() -> bool:
    # torch is always present where this plugin runs (vLLM depends on it); imported lazily so that
    # importing this module stays cheap.
    import torch

    return torch.version.hip is not None


@functools.cache
def get_route() -> Route:
    """Resolve ``PORTABLE_ATTN_ROUTE`` to a concrete route.

    ``auto`` (the default, also used when the variable is unset or empty) picks ``grouped`` on
    ROCm builds of torch and ``unified`` everywhere else. Matching is case-insensitive and ignores
    surrounding whitespace.

    Raises:
        ValueError: the value is not one of ``auto``, ``unified``, ``grouped``.
    """
    raw = os.environ.get(ROUTE_ENV, "")
    value = raw.strip().lower() or "auto"
    valid = get_args(RouteSetting)
    if value not in valid:
        raise ValueError(f"{ROUTE_ENV}={raw!r} is not valid; valid values: {', '.join(valid)}")
    if value == "auto":
        return "grouped" if _is_rocm() else "unified"
    return value  # type: ignore[return-value]  # narrowed by the membership check above


def reset_cache() -> None:
    """Forget parsed values so the next call re-reads the environment (for tests)."""
    get_route.cache_clear()
