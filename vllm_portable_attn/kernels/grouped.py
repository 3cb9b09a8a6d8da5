"""The grouped route: each request group runs through its own specialisation of the kernel.

`classify_requests` has sorted the batch into decode / extend / prefill groups; this launcher
then runs, in this order:
  decode   paged keys, decode-shaped tiles (one program holds every query of a spec-verify
           step), split-KV when the batch is small, then the segment merge;
  extend   paged keys, prefill-shaped tiles over the cached context plus the causal suffix;
  prefill  the new tokens' own K/V, dense and contiguous: no block-table lookups at all. On
           sm_90, large enough plain causal prefills run through TMA copies and warp
           specialisation instead (tma_prefill.py); elsewhere the portable kernel does.
Each launch's programs look up their group's slice of the sorted index list on the device. In
an eager step the host knows every group's size (`GroupSizes`, from the plan): an empty group
is not launched and each grid covers its own group only. Without them (a CUDA-graph capture,
whose launches serve every later batch of its size) all three launch over the whole batch's
static grid, which depends only on padded counts, and a program of an empty group exits at
once. Sizing the grids matters in mixed steps: a decode grid over a 4k-token batch is 4k
programs per KV head, nearly all of them idle.

The merge runs over every token of the (small) split batch, so it also writes rows of extend
and prefill tokens, from stale partials; those rows are rewritten by the extend and prefill
launches that follow it on the same stream.
"""

from __future__ import annotations

import torch

from vllm_portable_attn.kernels._attention_kernel import FP8_DTYPES, launch_attention
from vllm_portable_attn.kernels.classify import (
    GROUP_DECODE,
    GROUP_EXTEND,
    GROUP_PREFILL,
    GroupSizes,
    RequestGroups,
)
from vllm_portable_attn.kernels.configs import (
    MAX_DECODE_QUERY_LEN,
    attention_config,
    count_score_features,
    launch_shape,
)
from vllm_portable_attn.kernels.split_kv import SplitKVWorkspace, merge_segments
from vllm_portable_attn.kernels.tma_prefill import choose_tma_prefill, tma_prefill_attention
from vllm_portable_attn.kernels.unified import (
    head_pad,
    queries_per_kv_pad,
    validate_attention_inputs,
    validate_split,
)


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    groups: RequestGroups,
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
    group_sizes: GroupSizes | None = None,
    allow_tma_prefill: bool = True,
) -> None:
    """Paged attention over a mixed batch through per-group kernels, into `output` in place.

    Arguments are those of `unified_attention`, plus:
        key, value: [num_tokens, num_kv_heads, head_size], the new tokens' K/V (already in the
            cache too). Fresh prefills read them directly. None, or an fp8 cache (whose
            prefills must see the same quantised keys as every other route), sends prefills
            through the paged path instead.
        groups: this step's classification, from `classify_requests` with a decode threshold
            of at most MAX_DECODE_QUERY_LEN.
        group_sizes: each group's (tokens, requests), known on the host; an empty group is
            not launched and each grid covers its group only. None (a CUDA-graph capture: the
            captured launches serve every later batch of that size) launches all three over
            the whole batch. The TMA prefill runs only when they are given, since its grid is
            sized from them.
        allow_tma_prefill: False keeps fresh prefills on the portable kernel where the TMA
            prefill would apply (benchmarks compare the two).
    """
    del max_seq_len
    validate_attention_inputs(query, key_cache, value_cache, output, k_scale, v_scale)
    validate_split(query, num_segments, workspace)
    if query.shape[0] == 0:
        return
    pad_d, pad_q = head_pad(query.shape[2]), queries_per_kv_pad(query, key_cache)
    decode_size, extend_size, prefill_size = group_sizes or (None, None, None)
    decode_len = _decode_query_len(max_query_len, decode_size)
    elem = query.element_size()
    mods = count_score_features(sliding_window, softcap or None, alibi_slopes, sinks)
    decode_shape = launch_shape(decode_len, num_segments, narrow=narrow_split)
    kv_fp8 = key_cache.dtype in FP8_DTYPES
    decode_cfg = attention_config(pad_d, pad_q, decode_len, decode_shape, elem, mods, kv_fp8)
    extend_cfg = attention_config(pad_d, pad_q, max_query_len, "prefill", elem, mods, kv_fp8)
    dense_prefill = key is not None and value is not None and key_cache.dtype == query.dtype
    prefill_shape = "prefill_dense" if dense_prefill else "prefill"
    prefill_cfg = attention_config(pad_d, pad_q, max_query_len, prefill_shape, elem, mods, kv_fp8)
    tma_cfg = None
    if allow_tma_prefill:
        tma_cfg = choose_tma_prefill(
            query, key, value, key_cache, causal=causal, score_features=mods,
            prefill_size=prefill_size,
        )  # fmt: skip
    features = dict(
        softmax_scale=softmax_scale, causal=causal, sliding_window=sliding_window,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale,
        v_scale=v_scale, groups=groups.as_tuple(),
    )  # fmt: skip
    paged = (query, key_cache, value_cache, output, query_start_loc, seq_lens, block_table)

    if _launched(decode_size):
        launch_attention(*paged, config=decode_cfg, group=GROUP_DECODE, group_size=decode_size,
                         num_segments=num_segments, workspace=workspace, **features)  # fmt: skip
        if num_segments > 1:
            merge_segments(output, workspace, query_start_loc, num_segments)
    if _launched(extend_size):
        launch_attention(*paged, config=extend_cfg, group=GROUP_EXTEND, group_size=extend_size,
                         **features)  # fmt: skip
    if not _launched(prefill_size):
        return
    if tma_cfg is not None:
        tma_prefill_attention(query, key, value, output, query_start_loc, groups.as_tuple(),
                              group=GROUP_PREFILL, group_size=prefill_size,
                              softmax_scale=softmax_scale, config=tma_cfg)  # fmt: skip
    elif dense_prefill:
        launch_attention(query, key, value, output, query_start_loc, seq_lens, None,
                         config=prefill_cfg, group=GROUP_PREFILL, group_size=prefill_size,
                         **features)  # fmt: skip
    else:
        launch_attention(*paged, config=prefill_cfg, group=GROUP_PREFILL,
                         group_size=prefill_size, **features)  # fmt: skip


def _decode_query_len(max_query_len: int, decode_size: tuple[int, int] | None) -> int:
    """The longest query the decode group's tile must hold.

    A group of single-token decodes (as many tokens as requests) takes the decode tile even in
    a step whose longest query is a prefill's; the spec-verify tile it would get from the
    step's bound packs 8 query tokens per program, and on Hopper its three stages of 128-key
    tiles take about 200 KiB of shared memory: one program per SM, where the decode tile fits
    two. Otherwise the step's bound, at most MAX_DECODE_QUERY_LEN.
    """
    if decode_size is not None and decode_size[0] == decode_size[1]:
        return 1
    return min(max_query_len, MAX_DECODE_QUERY_LEN)


def _launched(group_size: tuple[int, int] | None) -> bool:
    """Whether a group launches: always when its size is unknown, else when it has requests."""
    return group_size is None or group_size[1] > 0
