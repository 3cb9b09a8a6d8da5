"""PortableAttentionBackend: what vLLM asks of an attention backend, answered truthfully.

vLLM validates a selected backend through the ``supports_*`` hooks below (via the base class's
``validate_configuration``, deliberately not overridden: its signature grows between releases).
Anything reported unsupported here makes ``--attention-backend CUSTOM`` fail at start-up with
the reason, instead of silently falling back to another backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from vllm_portable_attn import envs
from vllm_portable_attn._compat import (
    AttentionBackend,
    AttentionType,
    CacheDType,
    DeviceCapability,
    MultipleOf,
    current_platform,
    get_kv_cache_layout,
)

if TYPE_CHECKING:
    from vllm_portable_attn.impl import PortableAttentionImpl
    from vllm_portable_attn.plan import PortableAttentionMetadataBuilder

#: KV-cache page sizes must be a multiple of this (the kernels' key tiles are independent of the
#: page size, but 16 keeps every page a whole number of 16-row MMA fragments and matches vLLM's
#: default block size).
KERNEL_BLOCK_SIZE_MULTIPLE = 16

#: Head sizes that are tested. The kernels pad D to a power of two, so these cost at most 2x.
SUPPORTED_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 256]

#: Minimum CUDA compute capability per feature, as the Triton compiler supports them.
# Every fp8 KV cache needs sm89's native fp8 conversions. e4m3 (fp8e4nv) has none below it;
# e5m2 is emulated there, rounding ties away from zero and storing |x / scale| >= 61440 as inf
# instead of saturating, which would put inf in the cache.
_MIN_CAPABILITY_FP8_KV = DeviceCapability(8, 9)
_MIN_CAPABILITY_BF16 = DeviceCapability(8, 0)  # bf16 tensor-core dots
# AMD GPUs with fp8 hardware that compile_check compiles our fp8 kernels for: MI300 and MI350.
_ROCM_FP8_KV_ARCHS = ("gfx942", "gfx950")
# KV-cache dtypes accepted on ROCm. No fp8_e5m2: MI300 uses the fnuz fp8 variants and our e5m2
# kernels have not been compile-checked for gfx942 / gfx950.
_ROCM_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3")


class PortableAttentionBackend(AttentionBackend):
    """Paged attention through Triton kernels, registered as vLLM's ``CUSTOM`` backend."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # vLLM allocates every fp8 cache as uint8, and its TRITON_ATTN views even an fp8_e5m2 cache
    # as the platform's e4m3 type. Our impl views the bytes itself: fp8 / fp8_e4m3 as the
    # platform's e4m3 type, fp8_e5m2 as torch.float8_e5m2 (as FLASHINFER does), and the kernels
    # take their conversions from the cache's element type. Per-tensor scales: x / scale stored.
    # Per-platform limits (capability, ROCm) are in supports_combination.
    supported_kv_cache_dtypes: ClassVar[list[CacheDType]] = [
        "auto",
        "float16",
        "bfloat16",
        "fp8",
        "fp8_e4m3",
        "fp8_e5m2",
    ]
    # The KV cache is written by a separate op (vllm::unified_kv_cache_update ->
    # impl.do_kv_cache_update) before attention runs, so forward() only reads the cache.
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # Must be an AttentionBackendEnum member name: Attention.__init__ looks it up.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[PortableAttentionImpl]:
        from vllm_portable_attn.impl import PortableAttentionImpl

        return PortableAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[PortableAttentionMetadataBuilder]:
        from vllm_portable_attn.plan import PortableAttentionMetadataBuilder

        return PortableAttentionMetadataBuilder

    # -- KV-cache geometry --------------------------------------------------------------------

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: object = None) -> list[int | MultipleOf]:
        # `kv_cache_spec` is passed positionally by vLLM 0.33 and not at all by 0.26.
        return [MultipleOf(KERNEL_BLOCK_SIZE_MULTIPLE)]

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        """Logical per-layer cache shape ``(num_blocks, num_kv_heads, block_size, 2*head_size)``.

        K and V are packed in the last dim, ``[K | V]``, like TRITON_ATTN and FLASH_ATTN, so KV
        connectors and offloading that understand those backends understand ours.
        """
        if block_size % KERNEL_BLOCK_SIZE_MULTIPLE != 0:
            raise ValueError(
                f"block_size {block_size} is not a multiple of {KERNEL_BLOCK_SIZE_MULTIPLE}"
            )
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        """Physical order of the logical cache dims (vLLM 0.26; 0.33 ignores this hook).

        Mirrors TRITON_ATTN: NHD (vLLM's default) stores ``[blocks, block_size, heads, 2*hs]``;
        HND, when a KV connector or ``VLLM_KV_CACHE_LAYOUT`` asks for it, keeps the logical
        order. The kernels read the cache through its strides, so both work; following the global
        layout keeps us compatible with connectors that require HND.
        """
        layout = get_kv_cache_layout() if get_kv_cache_layout is not None else "NHD"
        if layout == "NHD":
            # With layers: (num_blocks, num_layers, block_size, num_kv_heads, 2*head_size).
            return (1, 0, 3, 2, 4) if include_num_layers_dimension else (0, 2, 1, 3)
        if layout == "HND":
            # With layers: (num_blocks, num_kv_heads, num_layers, block_size, 2*head_size).
            return (1, 2, 0, 3, 4) if include_num_layers_dimension else (0, 1, 2, 3)
        raise ValueError(f"unknown KV cache layout {layout!r}; valid: NHD, HND")

    # -- capability hooks read by validate_configuration ---------------------------------------

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        # Encoder, encoder-only and cross attention need non-causal masks over keys that are not
        # in the paged cache; not implemented yet.
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_compute_capability(cls, capability: DeviceCapability) -> bool:
        # Triton targets every GPU vLLM runs on; per-dtype limits are in supports_combination.
        return True

    @classmethod
    def supports_combination(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: CacheDType | None,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        device_capability: DeviceCapability,
    ) -> str | None:
        """Reject settings the kernels or the Triton compiler cannot handle on this GPU.

        Capabilities on ROCm are derived from the gfx arch and do not follow NVIDIA's numbering
        (gfx942 reports 9.4), so the capability checks apply to the other platforms only.
        """
        try:
            envs.get_route()
        except ValueError as err:  # a bad PORTABLE_ATTN_ROUTE fails selection, with the reason
            return str(err)
        # An unquantized cache must hold the model dtype: the kernels do not convert K/V.
        cache_torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            kv_cache_dtype or "auto"
        )
        if cache_torch_dtype is not None and cache_torch_dtype != dtype:
            return f"kv_cache_dtype {kv_cache_dtype} differs from the model dtype {dtype}"
        is_fp8_kv = kv_cache_dtype is not None and kv_cache_dtype.startswith("fp8")
        if current_platform.is_rocm():
            if (kv_cache_dtype or "auto") not in _ROCM_KV_CACHE_DTYPES:
                return (
                    f"kv_cache_dtype {kv_cache_dtype} is not supported on ROCm; supported: "
                    f"{', '.join(_ROCM_KV_CACHE_DTYPES)}"
                )
            arch = _rocm_gcn_arch() if is_fp8_kv else None
            if arch is not None and arch not in _ROCM_FP8_KV_ARCHS:
                supported = ", ".join(_ROCM_FP8_KV_ARCHS)
                return f"fp8 KV cache on ROCm needs one of {supported} (got {arch})"
            return None
        if device_capability is None:
            return None
        if is_fp8_kv and device_capability < _MIN_CAPABILITY_FP8_KV:
            return (
                f"kv_cache_dtype {kv_cache_dtype} needs compute capability >= "
                f"{_MIN_CAPABILITY_FP8_KV.as_version_str()} (got "
                f"{device_capability.as_version_str()}); supported here: "
                f"{', '.join(_kv_cache_dtypes_for(device_capability))}"
            )
        uses_bf16 = dtype == torch.bfloat16 or kv_cache_dtype == "bfloat16"
        if uses_bf16 and device_capability < _MIN_CAPABILITY_BF16:
            return (
                f"bfloat16 needs compute capability >= {_MIN_CAPABILITY_BF16.as_version_str()} "
                f"(got {device_capability.as_version_str()})"
            )
        return None


def _kv_cache_dtypes_for(capability: DeviceCapability) -> list[str]:
    """The KV-cache dtypes a CUDA GPU of this capability can use (for refusal messages)."""
    return [
        str(d)
        for d in PortableAttentionBackend.supported_kv_cache_dtypes
        if not (d.startswith("fp8") and capability < _MIN_CAPABILITY_FP8_KV)
        and not (d == "bfloat16" and capability < _MIN_CAPABILITY_BF16)
    ]


def _rocm_gcn_arch() -> str:
    """The current AMD GPU's gfx name without feature flags: "gfx942:sramecc+" -> "gfx942"."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return str(getattr(props, "gcnArchName", "unknown")).split(":")[0]
