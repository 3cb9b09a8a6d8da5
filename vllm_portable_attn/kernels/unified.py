"""Paged attention for a whole mixed batch (decodes, extends, prefills) in one launch.

Each program owns one *query block* of one sequence and one KV head:
  * GQA packing: the block's rows are BLOCK_Q query tokens x every query head that reads this
    KV head, so each K/V tile is loaded once and feeds one tensor-core dot for the whole group.
  * Static grid: `num_tokens // BLOCK_Q + num_seqs` query blocks is an upper bound on
    sum(ceil(q_len / BLOCK_Q)) that needs no host sync; surplus programs exit at once. The grid
    depends only on padded counts, so it is safe inside full CUDA graphs of mixed batches.
  * Causal with the context offset: query i of a sequence sits at position
    context_len + i, where context_len = seq_len - q_len, and sees keys at or before it.
  * Split-KV: with NUM_SEGMENTS > 1 each program covers one slice of the key range and writes
    an unnormalised partial result; `merge_segments` (split_kv.py) combines them.
  * Tiles fully inside the visible region skip the mask arithmetic; only the boundary tiles
    (causal diagonal, sequence end, sliding-window start) pay for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_portable_attn.kernels._common import LOG2E, find_seq_idx, online_softmax_step, tanh
from vllm_portable_attn.kernels.configs import AttentionConfig, attention_config
from vllm_portable_attn.kernels.split_kv import SplitKVWorkspace, merge_segments

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


@triton.jit
def _attend_tiles(
    acc,  # [BLOCK_M, HEAD_PAD] fp32
    m_i,  # [BLOCK_M] fp32
    l_i,  # [BLOCK_M] fp32
    q,  # [BLOCK_M, HEAD_PAD]
    tile_start,
    tile_end,
    key_cache_ptr,  # this KV head of [num_blocks, page_size, num_kv_heads, head_size]
    value_cache_ptr,  # same layout as key_cache_ptr
    block_table_row_ptr,  # [max_blocks] int32, this sequence's pages
    stride_k_block,
    stride_k_slot,
    stride_v_block,
    stride_v_slot,
    seq_len,
    query_pos,  # [BLOCK_M] absolute position of each row's query token
    alibi_slope,  # [BLOCK_M] fp32 (USE_ALIBI)
    score_scale,  # softmax scale, times log2(e) unless USE_SOFTCAP
    softcap,
    window,
    k_scale,
    v_scale,
    offs_d,  # [HEAD_PAD]
    HEAD_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    d_mask = offs_d < HEAD_SIZE
    for tile in range(tile_start, tile_end):
        offs_n = tile * TILE_N + tl.arange(0, TILE_N)
        n_mask = offs_n < seq_len
        # The tile may span several pages or part of one: look up each key's page.
        page = tl.load(block_table_row_ptr + offs_n // PAGE_SIZE, mask=n_mask, other=0)
        page = page.to(tl.int64)  # page * stride overflows int32 on large caches
        slot = offs_n % PAGE_SIZE
        k = tl.load(
            key_cache_ptr
            + page[None, :] * stride_k_block
            + slot[None, :] * stride_k_slot
            + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # [HEAD_PAD, TILE_N]
        v = tl.load(
            value_cache_ptr
            + page[:, None] * stride_v_block
            + slot[:, None] * stride_v_slot
            + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [TILE_N, HEAD_PAD]
        if KV_FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)

        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if USE_SOFTCAP:
            s = softcap * tanh(s * (score_scale / softcap)) * LOG2E
        else:
            s = s * score_scale
        if USE_ALIBI:
            s += (alibi_slope[:, None] * (offs_n[None, :] - query_pos[:, None])) * LOG2E
        if MASKED:
            visible = n_mask[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= query_pos[:, None])
            if USE_SLIDING_WINDOW:
                visible = visible & (query_pos[:, None] - offs_n[None, :] < window)
            s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_seqs"])
def _unified_attention_kernel(
    query_ptr,  # [num_tokens, num_heads, head_size]
    key_cache_ptr,  # [num_blocks, page_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, page_size, num_kv_heads, head_size]
    output_ptr,  # [num_tokens, num_heads, head_size]            (NUM_SEGMENTS == 1)
    partial_out_ptr,  # [max_tokens, num_heads, max_segments, HEAD_PAD] fp32  (NUM_SEGMENTS > 1)
    partial_max_ptr,  # [max_tokens, num_heads, max_segments] fp32
    partial_sum_ptr,  # [max_tokens, num_heads, max_segments] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    block_table_ptr,  # [num_seqs, max_blocks] int32
    alibi_slopes_ptr,  # [num_heads] (USE_ALIBI)
    sinks_ptr,  # [num_heads] (USE_SINKS)
    k_scale_ptr,  # [] fp32 (KV_FP8)
    v_scale_ptr,  # [] fp32 (KV_FP8)
    softmax_scale,
    softcap,
    window,
    num_seqs,
    stride_q_token,
    stride_q_head,
    stride_o_token,
    stride_o_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_bt_seq,
    stride_po_token,
    stride_po_head,
    stride_po_seg,
    stride_pm_token,
    stride_pm_head,
    QUERIES_PER_KV: tl.constexpr,
    QUERIES_PER_KV_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_block_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    seq = find_seq_idx(query_start_loc_ptr, q_block_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_local = q_block_idx - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row m of the block is query token m // QPK_PAD and query head kv_head * QPK + m % QPK_PAD.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    token_in_seq = q_block_local * BLOCK_Q + offs_m // QUERIES_PER_KV_PAD
    head_in_group = offs_m % QUERIES_PER_KV_PAD
    head = kv_head * QUERIES_PER_KV + head_in_group
    row_valid = (token_in_seq < q_len) & (head_in_group < QUERIES_PER_KV)
    token = q_start + token_in_seq
    query_pos = context_len + token_in_seq
    d_mask = offs_d < HEAD_SIZE

    q = tl.load(
        query_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head + offs_d[None, :],
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )

    # Key range of the block, and the sub-range that every row sees without masking.
    first_pos = context_len + q_block_local * BLOCK_Q
    last_pos = context_len + tl.minimum(q_block_local * BLOCK_Q + BLOCK_Q, q_len) - 1
    key_hi = seq_len
    full_hi = seq_len
    if IS_CAUSAL:
        key_hi = tl.minimum(seq_len, last_pos + 1)
        full_hi = tl.minimum(seq_len, first_pos + 1)
    key_lo = 0
    full_lo = 0
    if USE_SLIDING_WINDOW:
        key_lo = tl.maximum(first_pos - window + 1, 0)
        full_lo = tl.maximum(last_pos - window + 1, 0)
    tile_lo = key_lo // TILE_N
    tile_hi = tl.cdiv(key_hi, TILE_N)
    full_tile_lo = tl.minimum(tl.cdiv(full_lo, TILE_N), tile_hi)
    full_tile_hi = tl.maximum(full_hi // TILE_N, full_tile_lo)

    # This program's slice of the tiles.
    tiles_per_segment = tl.cdiv(tile_hi - tile_lo, NUM_SEGMENTS)
    seg_lo = tl.minimum(tile_lo + segment * tiles_per_segment, tile_hi)
    seg_hi = tl.minimum(seg_lo + tiles_per_segment, tile_hi)

    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_SINKS:
        # A sink is one extra logit per head with no value: it only adds exp(sink) to the
        # denominator. Exactly one segment may count it.
        if segment == 0:
            m_i = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * LOG2E
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)

    alibi_slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        alibi_slope = tl.load(alibi_slopes_ptr + head, mask=row_valid, other=0.0).to(tl.float32)
    k_scale = 1.0
    v_scale = 1.0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr).to(tl.float32)
        v_scale = tl.load(v_scale_ptr).to(tl.float32)
    score_scale = softmax_scale if USE_SOFTCAP else softmax_scale * LOG2E

    kv_head_k = key_cache_ptr + kv_head.to(tl.int64) * stride_k_head
    kv_head_v = value_cache_ptr + kv_head.to(tl.int64) * stride_v_head
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    # Three passes over the slice: masked head (window start), unmasked middle, masked tail.
    bounds = (
        (seg_lo, tl.minimum(seg_hi, full_tile_lo)),
        (tl.maximum(seg_lo, full_tile_lo), tl.minimum(seg_hi, full_tile_hi)),
        (tl.maximum(seg_lo, full_tile_hi), seg_hi),
    )
    for i in tl.static_range(3):
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, bounds[i][0], bounds[i][1],
            kv_head_k, kv_head_v, bt_row,
            stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
            seq_len, query_pos, alibi_slope, score_scale, softcap, window, k_scale, v_scale,
            offs_d, HEAD_SIZE, TILE_N, PAGE_SIZE, i != 1,
            IS_CAUSAL, USE_SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, KV_FP8, DOT_PRECISION,
        )  # fmt: skip

    store_mask = row_valid[:, None] & d_mask[None, :]
    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            output_ptr + token[:, None] * stride_o_token + head[:, None] * stride_o_head
            + offs_d[None, :],
            out.to(output_ptr.dtype.element_ty),
            mask=store_mask,
        )  # fmt: skip
    else:
        tl.store(
            partial_out_ptr + token[:, None] * stride_po_token + head[:, None] * stride_po_head
            + segment * stride_po_seg + offs_d[None, :],
            acc,
            mask=store_mask,
        )  # fmt: skip
        stat_offset = token * stride_pm_token + head * stride_pm_head + segment
        tl.store(partial_max_ptr + stat_offset, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + stat_offset, l_i, mask=row_valid)


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
        config: tile configuration; None looks it up in the per-architecture table. Only
            benchmarks and config sweeps pass one.
    """
    del max_seq_len
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key_cache.shape[2]
    _validate(query, key_cache, value_cache, output, num_segments, workspace, k_scale, v_scale)
    if num_tokens == 0:
        return
    queries_per_kv = num_heads // num_kv_heads
    queries_per_kv_pad = triton.next_power_of_2(queries_per_kv)
    head_pad = max(triton.next_power_of_2(head_size), 16)
    cfg = config or attention_config(head_pad, queries_per_kv_pad, max_query_len)
    if cfg.block_m != cfg.block_q * queries_per_kv_pad:
        raise ValueError(f"{cfg} does not pack {queries_per_kv_pad} query heads per KV head")
    num_seqs = seq_lens.shape[0]
    kv_fp8 = key_cache.dtype in FP8_DTYPES

    split = num_segments > 1
    ws = workspace if split else None
    placeholder = query  # stands in for pointers that a disabled feature never reads
    grid = (num_tokens // cfg.block_q + num_seqs, num_kv_heads, num_segments)
    _unified_attention_kernel[grid](
        query, key_cache, value_cache, output,
        ws.partial_out if ws else placeholder,
        ws.partial_max if ws else placeholder,
        ws.partial_sum if ws else placeholder,
        query_start_loc, seq_lens, block_table,
        alibi_slopes if alibi_slopes is not None else placeholder,
        sinks if sinks is not None else placeholder,
        k_scale if kv_fp8 else placeholder,
        v_scale if kv_fp8 else placeholder,
        softmax_scale,
        softcap or 0.0,
        sliding_window or 0,
        num_seqs,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        ws.partial_out.stride(0) if ws else 0,
        ws.partial_out.stride(1) if ws else 0,
        ws.partial_out.stride(2) if ws else 0,
        ws.partial_max.stride(0) if ws else 0,
        ws.partial_max.stride(1) if ws else 0,
        QUERIES_PER_KV=queries_per_kv,
        QUERIES_PER_KV_PAD=queries_per_kv_pad,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_Q=cfg.block_q,
        BLOCK_M=cfg.block_m,
        TILE_N=cfg.tile_n,
        PAGE_SIZE=key_cache.shape[1],
        NUM_SEGMENTS=num_segments,
        IS_CAUSAL=causal,
        USE_SLIDING_WINDOW=sliding_window is not None,
        USE_SOFTCAP=bool(softcap),
        USE_ALIBI=alibi_slopes is not None,
        USE_SINKS=sinks is not None,
        KV_FP8=kv_fp8,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        merge_segments(output, workspace, query_start_loc, num_segments)


def _validate(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    num_segments: int,
    workspace: SplitKVWorkspace | None,
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
    if num_segments > 1:
        if workspace is None:
            raise ValueError("num_segments > 1 needs a SplitKVWorkspace")
        workspace.check_fits(query.shape[0], query.shape[1], num_segments)
