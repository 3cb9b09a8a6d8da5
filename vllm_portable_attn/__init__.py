"""vllm_portable_attn: an out-of-tree vLLM attention backend with Triton kernels.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point and calls it in every
process (front end, engine core, workers). Select the backend with
``vllm serve MODEL --attention-backend CUSTOM``.

Importing this package must stay cheap and must not import vLLM, torch or Triton: vLLM imports
every general plugin early, sometimes before the platform is resolved.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["BACKEND_CLASS_PATH", "__version__", "register"]

#: Dotted path vLLM resolves lazily when the CUSTOM backend is first selected.
BACKEND_CLASS_PATH = "vllm_portable_attn.backend.PortableAttentionBackend"

# Logger name under vLLM's "vllm" root: vLLM configures handlers on that root only, so a logger
# named after our package would be silent. Shared with _compat.init_logger's naming.
_LOGGER_NAME = "vllm.portable_attn"

_registered = False


def register() -> None:
    """Register :class:`~vllm_portable_attn.backend.PortableAttentionBackend` as vLLM's CUSTOM
    attention backend.

    Idempotent within a process. vLLM swallows exceptions raised by general plugins (it only
    logs them), which would make a broken install show up much later as "Backend CUSTOM must be
    registered before use". So any failure is logged here with a full traceback through vLLM's
    logger, then re-raised.
    """
    global _registered
    if _registered:
        return
    try:
        from vllm_portable_attn import _compat

        _compat.register_backend(_compat.AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
    except Exception:
        # Not _compat.init_logger: the failure may be that _compat itself cannot import vLLM.
        # A plain logger under the "vllm" root still reaches vLLM's handler.
        logging.getLogger(_LOGGER_NAME).exception(
            "vllm_portable_attn %s FAILED to register its attention backend as CUSTOM; "
            "'--attention-backend CUSTOM' will not work in this process",
            __version__,
        )
        raise
    _registered = True
    _compat.init_logger(_LOGGER_NAME).info(
        "vllm_portable_attn %s registered as CUSTOM attention backend (%s)",
        __version__,
        BACKEND_CLASS_PATH,
    )
