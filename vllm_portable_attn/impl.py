"""PortableAttentionImpl: runs the plan built by plan.py in every attention layer.

vLLM calls two methods per layer and step, as two custom ops:
``do_kv_cache_update`` (scatter this step's K/V into the paged cache), then ``forward`` (attention
of the step's queries over the cache). Both see the cache as the logical
``[num_blocks, num_kv_heads, block_size, 2*head_size]`` tensor with physical (NHD by default)
strides; we take strided ``[num_blocks, block_size, num_kv_heads, head_size]`` K and V views of it
and never copy.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_portable_attn import envs
from vllm_portable_attn._compat import (
    AttentionImpl,
    AttentionLayer,
    AttentionType,
    current_platform,
    get_logger,
)
from vllm_portable_attn.kernels import (
    GroupSizes,
    choose_tma_prefill,
    count_score_features,
    grouped_attention,
    unified_attention,
    write_kv_cache,
)
from vllm_portable_attn.plan import PortableAttentionMetadata
from vllm_portable_attn.precompile import precompile_step_shapes

logger = get_logger(__name__)

#: KV-cache dtype strings this impl reads. Keep in sync with
#: PortableAttentionBackend.supported_kv_cache_dtypes (selection rejects the rest first).
#: vLLM allocates fp8 caches as uint8; the impl views them as the fp8 type of the string.
_FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")
_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", *_FP8_KV_CACHE_DTYPES)

#: Extra constructor arguments we understand, with the value that means "feature off" (None: any
#: value is handled). Unknown arguments are rejected: a model passes them because they change
#: the attention it expects, and ignoring them would give wrong outputs silently.
_EXTRA_ARGS_OFF_VALUE: dict[str, Any] = {
    "sinks": None,
    "use_alibi_sqrt": False,  # only passed to backends whose supports_alibi_sqrt() is True
    "chunk_lookback": -1,  # Gemma3 chunked lookback; vLLM asserts TRITON_ATTN when it is used
}


class PortableAttentionImpl(AttentionImpl[PortableAttentionMetadata]):
    """Decoder self-attention over vLLM's paged KV cache with vllm_portable_attn's kernels."""

    # Decode context parallelism needs the softmax LSE back from the kernel; we do not return it.
    supports_dcp = False

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Same positional contract as every vLLM impl (Attention.__init__ calls it so).

        ``kwargs`` may carry ``sinks``: a ``[num_heads]`` tensor of per-head sink logits (the
        model's parameter, read at every call so weight loading after construction is seen).
        """
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(
                f"vllm_portable_attn supports decoder self-attention only, not attn_type "
                f"{attn_type!r}"
            )
        _check_extra_args(kwargs)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
            )
        if kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {kv_cache_dtype!r} is not supported; valid: "
                f"{', '.join(_KV_CACHE_DTYPES)}"
            )
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        if logits_soft_cap is not None and logits_soft_cap < 0:
            raise ValueError(f"logits_soft_cap must be >= 0, got {logits_soft_cap}")
        if alibi_slopes is not None and len(alibi_slopes) != num_heads:
            raise ValueError(f"{len(alibi_slopes)} ALiBi slopes for {num_heads} heads")
        sinks: torch.Tensor | None = kwargs.get("sinks")
        if sinks is not None and tuple(sinks.shape) != (num_heads,):
            raise ValueError(f"sinks must have shape ({num_heads},), got {tuple(sinks.shape)}")

        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # vLLM's window length w: a query at p sees keys in (p - w, p], the kernels' convention.
        self.sliding_window = sliding_window
        # 0 and None both mean "no soft cap" in vLLM (flash-attn's convention).
        self.logits_soft_cap = logits_soft_cap or None
        # Model init runs under the target device as default device, so this lands on the GPU
        # there; forward() moves it once if it did not (e.g. impls built by hand in tests).
        self.alibi_slopes = (
            None if alibi_slopes is None else torch.tensor(alibi_slopes, dtype=torch.float32)
        )
        # The kernels load sinks in any float dtype and upcast, so no fp32 copy (which would go
        # stale when the weights are loaded into the parameter later) is made.
        self.sinks = sinks
        # Set iff the cache is fp8: the type to view vLLM's uint8 cache as. fp8_e5m2 is
        # float8_e5m2 (as FLASHINFER reads it; TRITON_ATTN would use the platform's e4m3 type),
        # fp8 / fp8_e4m3 the platform's e4m3 type (e4m3fnuz on MI300).
        self.fp8_dtype: torch.dtype | None = _fp8_view_dtype(kv_cache_dtype)
        # Until this layer's first eager step has compiled its launches (precompile.py).
        self._precompile_pending = True
        # Windows, soft caps, ALiBi and sinks in use (the TMA prefill takes none of them).
        self.score_features: int = count_score_features(
            sliding_window, self.logits_soft_cap, alibi_slopes, sinks
        )
        logger.info_once(
            "vllm_portable_attn: route=%s, heads %d/%d (q/kv), head size %d, kv cache %s, "
            "sliding window %s, softcap %s, alibi %s, sinks %s",
            envs.get_route(),
            num_heads,
            num_kv_heads,
            head_size,
            kv_cache_dtype,
            sliding_window,
            self.logits_soft_cap,
            alibi_slopes is not None,
            sinks is not None,
        )

    def _split_kv_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided ``[num_blocks, block_size, num_kv_heads, head_size]`` K and V views."""
        if self.fp8_dtype is not None:
            # vLLM allocates fp8 caches as uint8; same element size, so any strides can be viewed.
            kv_cache = kv_cache.view(self.fp8_dtype)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        return key_cache, value_cache

    def _kv_scales(self, layer: AttentionLayer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Per-tensor 0-dim fp32 device tensors on the layer (1.0 unless the checkpoint has them).
        if self.fp8_dtype is not None:
            return layer._k_scale, layer._v_scale
        return None, None

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write this step's K/V (``[T, num_kv_heads, head_size]``) into their cache slots.

        ``slot_mapping`` covers the (padded) tokens to write; slot -1 marks padding and is skipped.
        """
        key_cache, value_cache = self._split_kv_cache(kv_cache)
        k_scale, v_scale = self._kv_scales(layer)
        write_kv_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)

    def _runs_grouped_launches(
        self,
        md: PortableAttentionMetadata,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        key_cache: torch.Tensor,
        group_sizes: GroupSizes | None,
    ) -> bool:
        """The grouped route always; on the unified route, a step the builder classified for
        the TMA prefill, in a layer where that kernel applies (plan.py's module docstring):
        the grouped launches are how its prefills reach it."""
        if md.route == "grouped":
            return True
        if md.request_groups is None:
            return False
        tma_config = choose_tma_prefill(
            query, key, value, key_cache, causal=True, score_features=self.score_features,
            prefill_size=group_sizes[2] if group_sizes else None,
        )  # fmt: skip
        return tma_config is not None

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: PortableAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query[:num_actual_tokens]`` over the cache, into ``output`` in place.

        The cache already holds this step's K/V (do_kv_cache_update ran first). The unified
        launch reads only the cache; the grouped launches read fresh prompts' K/V straight from
        ``key``/``value``. Rows of ``output`` past ``num_actual_tokens`` (padding) are left as
        they are.
        """
        if output_scale is not None or output_block_scale is not None:
            # fused_output_quant_supported() is False, so vLLM should never ask for this.
            raise NotImplementedError("vllm_portable_attn does not fuse output quantization")
        if attn_metadata is None:
            # Memory-profiling run: no metadata, and the cache is a placeholder.
            return output.fill_(0)

        key_cache, value_cache = self._split_kv_cache(kv_cache)
        k_scale, v_scale = self._kv_scales(layer)
        if self.alibi_slopes is not None and self.alibi_slopes.device != query.device:
            self.alibi_slopes = self.alibi_slopes.to(query.device)
        # A layer that shares another layer's cache did not write its own K/V there, so its
        # key/value are not what the cache holds: its prefills must read the cache.
        if self.kv_sharing_target_layer_name:
            key = value = None

        tensors = (query, key, value, key_cache, value_cache, output, k_scale, v_scale)
        plan = attn_metadata.precompile
        if self._precompile_pending and plan is not None and not graph_capture_in_progress():
            # Once per layer, at its first eager step (vLLM runs one in its warm-up). Not inside
            # a CUDA-graph capture: loading a compiled module may synchronise, which a capture
            # forbids.
            self._precompile_pending = False
            precompile_step_shapes(lambda md: self._attend(md, *tensors), attn_metadata, plan)
        self._attend(attn_metadata, *tensors)
        return output

    def _attend(
        self,
        md: PortableAttentionMetadata,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        output: torch.Tensor,
        k_scale: torch.Tensor | None,
        v_scale: torch.Tensor | None,
    ) -> None:
        """The attention launches `md` asks for, over the first `md.num_actual_tokens` rows."""
        num_tokens = md.num_actual_tokens
        options = dict(
            max_query_len=md.max_query_len,
            max_seq_len=md.max_seq_len,
            softmax_scale=self.scale,
            causal=True,
            sliding_window=self.sliding_window,
            softcap=self.logits_soft_cap,
            alibi_slopes=self.alibi_slopes,
            sinks=self.sinks,
            k_scale=k_scale,
            v_scale=v_scale,
            num_segments=md.num_segments,
            workspace=md.workspace,
            narrow_split=md.narrow_split,
        )
        lengths = (md.query_start_loc, md.seq_lens, md.block_table)
        query, output = query[:num_tokens], output[:num_tokens]
        if key is not None and value is not None:
            key, value = key[:num_tokens], value[:num_tokens]
        else:
            key = value = None
        # Host-side facts about a classified step's groups; a captured graph replays other
        # steps, so a capture must not use them.
        capturing = md.request_groups is not None and graph_capture_in_progress()
        group_sizes = None if capturing else md.group_sizes
        if self._runs_grouped_launches(md, query, key, value, key_cache, group_sizes):
            grouped_attention(
                query, key, value, key_cache, value_cache, output, *lengths,
                md.request_groups, group_sizes=group_sizes, **options,
            )  # fmt: skip
        else:
            unified_attention(query, key_cache, value_cache, output, *lengths, **options)


def _fp8_view_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The fp8 type an fp8 KV cache of this dtype string holds; None if it is not fp8."""
    if kv_cache_dtype == "fp8_e5m2":
        return torch.float8_e5m2
    if kv_cache_dtype in _FP8_KV_CACHE_DTYPES:
        return current_platform.fp8_dtype()
    return None


def graph_capture_in_progress() -> bool:
    """Whether launches are being captured into a CUDA graph right now.

    An eager launch may skip request groups the host knows are empty; a captured graph is
    replayed for every later batch of its size, whatever its groups, so a capture launches all.
    """
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_extra_args(kwargs: dict[str, Any]) -> None:
    """Reject extra impl arguments that would change the attention we compute."""
    unknown = sorted(set(kwargs) - set(_EXTRA_ARGS_OFF_VALUE))
    if unknown:
        raise ValueError(
            f"vllm_portable_attn does not support the attention arguments {unknown}; "
            f"supported: {sorted(_EXTRA_ARGS_OFF_VALUE)}"
        )
    for name, off in _EXTRA_ARGS_OFF_VALUE.items():
        if off is not None and name in kwargs and kwargs[name] != off:
            raise ValueError(
                f"vllm_portable_attn does not support {name}={kwargs[name]!r} (only {off!r})"
            )
