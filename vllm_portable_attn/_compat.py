"""Every vLLM import of vllm_portable_attn, in one place.

The rest of the package imports vLLM names from here only, so a vLLM release that moves or
renames something needs a change in this file alone. Supported: vLLM 0.26.0 through 0.33.0; CI
runs the test suite against both ends. The differences between them are handled here (see the
interface notes in shared/docs/vllm-backend-interface.md, the "0.33 delta" sections).

Nothing in the kernels imports this module: kernels must run without vLLM.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.kv_cache_interface import AttentionSpec

try:  # An empty marker base class in 0.26 and 0.33; tolerate its removal.
    from vllm.v1.attention.backend import AttentionMetadata
except ImportError:  # pragma: no cover - depends on the vLLM version

    class AttentionMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM's empty metadata marker class."""


try:  # 0.26: the global "NHD"/"HND" switch. 0.33 removed it (layouts come from KVCacheLayout).
    from vllm.v1.attention.backends.utils import get_kv_cache_layout
except ImportError:  # pragma: no cover - depends on the vLLM version
    get_kv_cache_layout = None  # type: ignore[assignment]

try:  # 0.33: one model-wide physical layout, a permutation of [layers, blocks, heads, slots, C],
    # resolved from every backend's supported_kv_cache_layouts(). Absent in 0.26.
    from vllm.v1.kv_cache_layout import KVCacheLayout
except ImportError:  # pragma: no cover - depends on the vLLM version
    KVCacheLayout = None  # type: ignore[assignment,misc]

#: Whether this vLLM allocates the KV cache through the backend's get_kv_cache_shape /
#: get_kv_cache_stride_order hooks (0.26) rather than from the KV-cache spec and a
#: KVCacheLayout (0.33, which never calls those hooks).
KV_CACHE_SHAPE_FROM_BACKEND = KVCacheLayout is None

if TYPE_CHECKING:
    from vllm.config.cache import CacheDType
    from vllm.platforms.interface import Platform
else:
    CacheDType = str

__all__ = [
    "AttentionBackend",
    "AttentionBackendEnum",
    "AttentionCGSupport",
    "AttentionImpl",
    "AttentionLayer",
    "AttentionMetadata",
    "AttentionMetadataBuilder",
    "AttentionSpec",
    "AttentionType",
    "CacheDType",
    "CommonAttentionMetadata",
    "DeviceCapability",
    "KVCacheLayout",
    "KV_CACHE_SHAPE_FROM_BACKEND",
    "MultipleOf",
    "VllmConfig",
    "adaptive_verification_enabled",
    "current_platform",
    "get_kv_cache_layout",
    "get_logger",
    "init_logger",
    "num_attention_heads_of_layers",
    "register_backend",
]


def __getattr__(name: str) -> Any:
    # `current_platform` is resolved lazily by vLLM itself (NVML/ROCm probing). Importing it at
    # module level would force that probe inside register(), which must stay cheap; resolve it
    # on first attribute access instead (i.e. when the backend module is imported).
    if name == "current_platform":
        from vllm.platforms import current_platform

        return current_platform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    current_platform: Platform


def get_logger(module_name: str) -> logging.Logger:
    """A vLLM logger for one of our modules.

    vLLM attaches its handler to the ``vllm`` logger only (with ``propagate=False``), so a logger
    named ``vllm_portable_attn.x`` would print nothing. Ours live under ``vllm.portable_attn``.
    """
    suffix = module_name.removeprefix("vllm_portable_attn").lstrip(".")
    return init_logger("vllm.portable_attn" + (f".{suffix}" if suffix else ""))


def num_attention_heads_of_layers(vllm_config: VllmConfig, layer_names: list[str]) -> int | None:
    """Per-rank query-head count shared by the named attention layers, or None if none is found.

    vLLM's own helper does this in 0.26 (and asserts the layers agree); on releases without it
    we read the layers from the static forward context ourselves.
    """
    try:
        from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers
    except ImportError:  # pragma: no cover - depends on the vLLM version
        get_num_attention_heads_from_layers = None
    if get_num_attention_heads_from_layers is not None:
        return get_num_attention_heads_from_layers(vllm_config, layer_names)

    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
    heads = {layer.impl.num_heads for layer in layers.values()}
    if len(heads) > 1:
        raise ValueError(f"layers {layer_names} disagree on num_heads: {sorted(heads)}")
    return heads.pop() if heads else None


def adaptive_verification_enabled(vllm_config: VllmConfig) -> bool:
    """Whether speculative decoding may trim verify queries on the device (vLLM 0.33+).

    With adaptive verification the device ``query_start_loc`` can give a request fewer query
    tokens than the host copy (``query_start_loc_cpu``) says; host-side planning must then treat
    the host lengths as upper bounds. 0.26 has no such option.
    """
    speculative_config = getattr(vllm_config, "speculative_config", None)
    return bool(getattr(speculative_config, "enable_adaptive_verification", False))
