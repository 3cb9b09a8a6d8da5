"""The unified route: a whole mixed batch (decodes, extends, prefills) in one launch.

Every sequence runs through the same specialisation of `attention_kernel`, in batch order;
its tile shape is decode-shaped when no query is longer than a spec-verify step and
prefill-shaped otherwise. Small decode batches split their keys (split-KV) and merge after.
"""

from __future__ import annotations

import torch
import triton

from vllm_portable_attn.kernels._attention_kernel import FP8_DTYPES, launch_attention
from vllm_portable_attn.kernels.configs import (
    AttentionConfig,
    attention_config,
    count_score_features,
    launch_shape,
)
from vllm_portable_attn.kernels.split_kv import SplitKVWorkspace, merge_segments

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unified_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    max_query_len: int,
    max_seq_len: int,
    softmax_scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_segments: int = 1,
    workspace: SplitKVWorkspace | None = None,
    narrow_split: bool = False,
    config: AttentionConfig | None = None,
) -> None:
    """Paged attention over a mixed batch, written into `output` in place.

    Args:
        query: [num_tokens, num_heads, head_size], tokens of all sequences back to back.
        key_cache, value_cache: [num_blocks, page_size, num_kv_heads, head_size] views with any
            strides (the last dim contiguous); fp8 caches are dequantised with k/v_scale.
        output: [num_tokens, num_heads, head_size]; rows of tokens outside every sequence are
            left untouched.
        query_start_loc: [num_seqs + 1] int32 cumulative query lengths.
        seq_lens: [num_seqs] int32 total key length of each sequence (context + new tokens).
        block_table: [num_seqs, max_blocks] int32 page ids of each sequence.
        max_query_len: longest query; selects decode- or prefill-shaped tiles.
        max_seq_len: unused by the kernel (kept for the reference's signature).
        sliding_window: window length w: a query at p sees keys in (p - w, p].
        softcap: c, scores become c * tanh(score / c).
        alibi_slopes, sinks: [num_heads] per-head ALiBi slopes and attention-sink logits.
        num_segments: split-KV segments per sequence (a power of two); > 1 needs `workspace`.
        narrow_split: a split launch over few (request, KV head) pairs, which reads the
            *_split_narrow rows (`configs.is_narrow_split`; the metadata builder decides it
            from the request count, so it is fixed per CUDA graph and precompiled).
        config: tile configuration; None looks it up in the per-architecture table. Only
            benchmarks and config sweeps pass one.
    """
    del max_seq_len
    validate_attention_inputs(query, key_cache, value_cache, output, k_scale, v_scale)
    validate_split(query, num_segments, workspace)
    if query.shape[0] == 0:
        return
    cfg = config or attention_config(
        head_pad(query.shape[2]),
        queries_per_kv_pad(query, key_cache),
        max_query_len,
        launch_shape(max_query_len, num_segments, narrow=narrow_split),
        query.element_size(),
        count_score_features(sliding_window, softcap or None, alibi_slopes, sinks),
        kv_fp8=key_cache.dtype in FP8_DTYPES,
    )
    launch_attention(
        query, key_cache, value_cache, output, query_start_loc, seq_lens, block_table,
        config=cfg, softmax_scale=softmax_scale, causal=causal, sliding_window=sliding_window,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale,
        v_scale=v_scale, num_segments=num_segments, workspace=workspace,
    )  # fmt: skip
    if num_segments > 1:
        merge_segments(output, workspace, query_start_loc, num_segments)


def head_pad(head_size: int) -> int:
    """The power-of-two width the kernels compute head vectors in (masked past head_size)."""
    return max(triton.next_power_of_2(head_size), 16)


def queries_per_kv_pad(query: torch.Tensor, key_cache: torch.Tensor) -> int:
    """Query heads per KV head, rounded up to a power of two for the GQA-packed rows."""
    return triton.next_power_of_2(query.shape[1] // key_cache.shape[2])


def validate_attention_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    """Fail in Python, with the supported set named, rather than deep inside a kernel."""
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"query dtype {query.dtype} is not one of {SUPPORTED_DTYPES}")
    if output.shape != query.shape:
        raise ValueError(f"output shape {tuple(output.shape)} != query {tuple(query.shape)}")
    if key_cache.shape != value_cache.shape or key_cache.dim() != 4:
        raise ValueError("key/value caches must both be [num_blocks, page_size, kv_heads, head]")
    if key_cache.shape[3] != query.shape[2]:
        raise ValueError(f"cache head size {key_cache.shape[3]} != query {query.shape[2]}")
    if query.shape[1] % key_cache.shape[2]:
        raise ValueError(f"{query.shape[1]} query heads is not a multiple of {key_cache.shape[2]}")
    if key_cache.dtype not in FP8_DTYPES and key_cache.dtype != query.dtype:
        raise ValueError(f"cache dtype {key_cache.dtype} must equal query dtype or be fp8")
    if key_cache.dtype in FP8_DTYPES and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or output.stride(-1) != 1:
        raise ValueError("the head dimension of query, caches and output must be contiguous")


def validate_split(
    query: torch.Tensor, num_segments: int, workspace: SplitKVWorkspace | None
) -> None:
    """A split launch needs a workspace large enough for every query token."""
    if num_segments > 1:
        if workspace is None:
            raise ValueError("num_segments > 1 needs a SplitKVWorkspace")
        workspace.check_fits(query.shape[0], query.shape[1], num_segments)
