"""The attention kernel behind both routes, compiled into a specialisation per use.

Each program owns one *query block* of one sequence and one KV head:
  * GQA packing: the block's rows are BLOCK_Q query tokens x every query head that reads this
    KV head, so each K/V tile is loaded once and feeds one tensor-core dot for the whole group.
  * Static grid: `num_query_blocks` (num_tokens // BLOCK_Q + num_seqs, or num_tokens for
    one-token blocks) bounds sum(ceil(q_len / BLOCK_Q)) without a host sync (see
    `find_seq_idx`); surplus programs exit at once. The grid depends only on padded counts,
    so it is safe inside full CUDA graphs of mixed batches. An eager grouped launch passes
    its group's exact host-known size instead, so idle programs do not crowd a mixed step.
    Blocks are served in reverse order, so the longest causal blocks start first.
  * Causal with the context offset: query i of a sequence sits at position context_len + i,
    where context_len = seq_len - q_len, and sees keys at or before it.
  * Split-KV: with NUM_SEGMENTS > 1 each program covers one slice of the key range and writes
    an unnormalised partial result that `merge_segments` (split_kv.py) combines. A slice is at
    least MIN_SEGMENT_TILES tiles, and SEGMENT_TILES where the sequence still fills
    fill_segments slices, so a short sequence uses fewer slices than the grid holds; the
    programs past its last slice only mark themselves empty.
  * Tiles fully inside the visible region skip the mask arithmetic; only the boundary tiles
    (causal diagonal, sequence end, sliding-window start) pay for it.

Which sequences a launch serves is a constexpr too. GROUP < 0: all of them, in batch order (the
unified route). GROUP >= 0: only the requests the plan classified into that group (the grouped
route), found through a group-sorted index list, so vLLM's batch order never matters. PAGED
picks where keys come from: the paged cache through the block table, or (fresh prefills) the
new tokens' own K/V, contiguous and without a table lookup.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_portable_attn.kernels._common import (
    LOG2E,
    device_num_sms,
    find_seq_idx,
    first_block_of,
    num_query_blocks,
    online_softmax_step,
    tanh,
)
from vllm_portable_attn.kernels.configs import MIN_SEGMENT_TILES, AttentionConfig, fill_segments
from vllm_portable_attn.kernels.split_kv import SplitKVWorkspace

FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


@triton.jit
def _tile_pages(block_table_row_ptr, tile, seq_len, TILE_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """The page id of each key of one key tile (0 past the sequence end)."""
    offs_n = tile * TILE_N + tl.arange(0, TILE_N)
    return tl.load(block_table_row_ptr + offs_n // PAGE_SIZE, mask=offs_n < seq_len, other=0)


@triton.jit
def _attend_tiles(
    acc,  # [BLOCK_M, HEAD_PAD] fp32
    m_i,  # [BLOCK_M] fp32
    l_i,  # [BLOCK_M] fp32
    q,  # [BLOCK_M, HEAD_PAD]
    tile_start,
    tile_end,
    key_ptr,  # this KV head of the keys: paged [blocks, page, heads, D] or dense [tokens, heads, D]
    value_ptr,  # same layout as key_ptr
    block_table_row_ptr,  # [max_blocks] int32, this sequence's pages (PAGED)
    first_key_row,  # row of the sequence's first key in the dense K/V (not PAGED)
    stride_k,  # (block or token, slot, head)
    stride_v,  # (block or token, slot, head)
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
    PAGED: tl.constexpr,
    PAGE_LOOKAHEAD: tl.constexpr,
    KEYS_AS_ROWS: tl.constexpr,
    MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    d_mask = offs_d < HEAD_SIZE
    # The tile may span several pages or part of one: each key's page comes from the block
    # table. With PAGE_LOOKAHEAD the lookup runs one tile ahead, so the K/V addresses depend
    # only on a loop-carried value: the software pipeliner then treats the K/V loads as direct
    # and keeps two tiles in flight, as in the dense loop (+20-26% on paged prefill and extend,
    # H200). Decode tiles measured slower with it, so they look up the tile they load.
    if PAGED and PAGE_LOOKAHEAD:
        next_page = _tile_pages(block_table_row_ptr, tile_start, seq_len, TILE_N, PAGE_SIZE)
    for tile in range(tile_start, tile_end):
        offs_n = tile * TILE_N + tl.arange(0, TILE_N)
        n_mask = offs_n < seq_len
        if PAGED:
            if PAGE_LOOKAHEAD:
                page = next_page
                next_page = _tile_pages(block_table_row_ptr, tile + 1, seq_len, TILE_N, PAGE_SIZE)
            else:
                page = _tile_pages(block_table_row_ptr, tile, seq_len, TILE_N, PAGE_SIZE)
            row = page.to(tl.int64)  # page * stride overflows int32 on large caches
            slot = offs_n % PAGE_SIZE
        else:
            row = first_key_row + offs_n.to(tl.int64)
            slot = offs_n * 0
        kv_mask = n_mask[:, None] & d_mask[None, :]
        if KEYS_AS_ROWS:
            # K in V's layout, [keys, head dims]: the page ids and the mask are computed once
            # for both tiles, and the dot reads K transposed from shared memory for free.
            k = tl.trans(
                tl.load(
                    key_ptr + row[:, None] * stride_k[0] + slot[:, None] * stride_k[1]
                    + offs_d[None, :],
                    mask=kv_mask,
                    other=0.0,
                )
            )  # fmt: skip
        else:
            # The mask is built in this layout, not transposed: a transpose here would cost
            # the decode tiles a layout conversion.
            k = tl.load(
                key_ptr + row[None, :] * stride_k[0] + slot[None, :] * stride_k[1]
                + offs_d[:, None],
                mask=d_mask[:, None] & n_mask[None, :],
                other=0.0,
            )  # fmt: skip
        # k: [HEAD_PAD, TILE_N]
        v = tl.load(
            value_ptr + row[:, None] * stride_v[0] + slot[:, None] * stride_v[1] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [TILE_N, HEAD_PAD]
        if KV_FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)

        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        # Paged scores stay unscaled: the softmax step scales them in its exponent's FMA, one
        # pass over the tile fewer (H200: paged prefill and extend +4%). The dense loop measured
        # 1-2% slower that way (more live registers), so it scales first and passes scale 1, as
        # soft cap and ALiBi must (they need the scaled score).
        s_scale = score_scale
        if USE_SOFTCAP:
            s = softcap * tanh(s * (score_scale / softcap)) * LOG2E
            s_scale = 1.0
        elif USE_ALIBI or not PAGED:
            s = s * score_scale
            s_scale = 1.0
        if USE_ALIBI:
            s += (alibi_slope[:, None] * (offs_n[None, :] - query_pos[:, None])) * LOG2E
        if MASKED:
            visible = n_mask[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= query_pos[:, None])
            if USE_SLIDING_WINDOW:
                visible = visible & (query_pos[:, None] - offs_n[None, :] < window)
            s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, s_scale, v, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_seqs", "fill_segments"])
def attention_kernel(
    query_ptr,  # [num_tokens, num_heads, head_size]
    key_ptr,  # paged [num_blocks, page_size, kv_heads, head_size] or dense [tokens, kv_heads, D]
    value_ptr,  # same layout as key_ptr
    output_ptr,  # [num_tokens, num_heads, head_size]            (NUM_SEGMENTS == 1)
    partial_out_ptr,  # [max_tokens, num_heads, max_segments, HEAD_PAD] fp32  (NUM_SEGMENTS > 1)
    partial_max_ptr,  # [max_tokens, num_heads, max_segments] fp32
    partial_sum_ptr,  # [max_tokens, num_heads, max_segments] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    block_table_ptr,  # [num_seqs, max_blocks] int32 (PAGED)
    seq_order_ptr,  # [num_seqs] int32, request ids sorted by group (GROUP >= 0)
    order_cu_q_ptr,  # [num_seqs + 1] int32, cumulative query lengths in that order (GROUP >= 0)
    group_bounds_ptr,  # [num_groups + 1] int32, each group's first entry in the order
    alibi_slopes_ptr,  # [num_heads] (USE_ALIBI)
    sinks_ptr,  # [num_heads] (USE_SINKS)
    k_scale_ptr,  # [] fp32 (KV_FP8)
    v_scale_ptr,  # [] fp32 (KV_FP8)
    softmax_scale,
    softcap,
    window,
    num_seqs,
    fill_segments,  # slices a sequence keeps even below SEGMENT_TILES tiles each (split-KV)
    stride_q,  # (token, head)
    stride_o,  # (token, head)
    stride_k,  # (block or token, slot, head)
    stride_v,  # (block or token, slot, head)
    stride_bt,  # (seq,)
    stride_po,  # (token, head, segment) of partial_out
    stride_pm,  # (token, head) of partial_max / partial_sum
    QUERIES_PER_KV: tl.constexpr,
    QUERIES_PER_KV_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    MIN_SEGMENT_TILES: tl.constexpr,
    SEGMENT_TILES: tl.constexpr,
    GROUP: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_LOOKAHEAD: tl.constexpr,
    KEYS_AS_ROWS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Longest first: under causal masking a sequence's later query blocks see the most keys.
    # Programs start in index order, so walking the blocks backwards starts the heaviest ones
    # first and leaves the light ones to fill the tail of the last wave. The surplus programs
    # of the static grid now come first, and exit at once.
    q_block_idx = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    # Which sequence, and which of its query blocks, this program serves.
    if GROUP < 0:
        lo = 0
        hi = num_seqs
        cu_q_ptr = query_start_loc_ptr
    else:
        lo = tl.load(group_bounds_ptr + GROUP)
        hi = tl.load(group_bounds_ptr + GROUP + 1)
        cu_q_ptr = order_cu_q_ptr
    entry = find_seq_idx(cu_q_ptr, lo, hi, q_block_idx, BLOCK_Q)
    if entry < lo:
        return  # an empty group
    first_block = first_block_of(cu_q_ptr, lo, tl.load(cu_q_ptr + lo), entry, BLOCK_Q)
    q_block_local = q_block_idx - first_block
    seq = entry
    if GROUP >= 0:
        seq = tl.load(seq_order_ptr + entry)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
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

    # This program's slice of the tiles. The segment count is fixed per CUDA graph, the lengths
    # are not: a short sequence split NUM_SEGMENTS ways would give one-tile slices and programs
    # with nothing to do, each paying a program's start and a partial result to merge
    # (H200: 8 x 1k keys took 30 us in 16 slices, 21 us in 4). A slice prefers SEGMENT_TILES
    # tiles, and is cut shorter only to keep fill_segments slices, which fill the GPU.
    num_tiles = tile_hi - tile_lo
    preferred_tiles = tl.minimum(
        SEGMENT_TILES, tl.maximum(tl.cdiv(num_tiles, fill_segments), MIN_SEGMENT_TILES)
    )
    tiles_per_segment = tl.maximum(tl.cdiv(num_tiles, NUM_SEGMENTS), preferred_tiles)
    seg_lo = tl.minimum(tile_lo + segment * tiles_per_segment, tile_hi)
    seg_hi = tl.minimum(seg_lo + tiles_per_segment, tile_hi)
    if NUM_SEGMENTS > 1:
        if seg_lo >= seg_hi:
            # Past the last slice (segment 0 never is): an empty partial, marked by its max.
            stat_offset = token * stride_pm[0] + head * stride_pm[1] + segment
            empty = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            tl.store(partial_max_ptr + stat_offset, empty, mask=row_valid)
            return

    q = tl.load(
        query_ptr + token[:, None] * stride_q[0] + head[:, None] * stride_q[1] + offs_d[None, :],
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )

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

    key_head_ptr = key_ptr + kv_head.to(tl.int64) * stride_k[2]
    value_head_ptr = value_ptr + kv_head.to(tl.int64) * stride_v[2]
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt[0]
    # Three passes over the slice: masked head (window start), unmasked middle, masked tail.
    bounds = (
        (seg_lo, tl.minimum(seg_hi, full_tile_lo)),
        (tl.maximum(seg_lo, full_tile_lo), tl.minimum(seg_hi, full_tile_hi)),
        (tl.maximum(seg_lo, full_tile_hi), seg_hi),
    )
    for i in tl.static_range(3):
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, bounds[i][0], bounds[i][1],
            key_head_ptr, value_head_ptr, bt_row, q_start, stride_k, stride_v,
            seq_len, query_pos, alibi_slope, score_scale, softcap, window, k_scale, v_scale,
            offs_d, HEAD_SIZE, TILE_N, PAGE_SIZE, PAGED, PAGE_LOOKAHEAD, KEYS_AS_ROWS, i != 1,
            IS_CAUSAL, USE_SLIDING_WINDOW, USE_SOFTCAP, USE_ALIBI, KV_FP8, DOT_PRECISION,
        )  # fmt: skip

    store_mask = row_valid[:, None] & d_mask[None, :]
    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            output_ptr + token[:, None] * stride_o[0] + head[:, None] * stride_o[1]
            + offs_d[None, :],
            out.to(output_ptr.dtype.element_ty),
            mask=store_mask,
        )  # fmt: skip
    else:
        tl.store(
            partial_out_ptr + token[:, None] * stride_po[0] + head[:, None] * stride_po[1]
            + segment * stride_po[2] + offs_d[None, :],
            acc,
            mask=store_mask,
        )  # fmt: skip
        stat_offset = token * stride_pm[0] + head * stride_pm[1] + segment
        tl.store(partial_max_ptr + stat_offset, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + stat_offset, l_i, mask=row_valid)


def launch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    config: AttentionConfig,
    softmax_scale: float,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    alibi_slopes: torch.Tensor | None,
    sinks: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    num_segments: int = 1,
    workspace: SplitKVWorkspace | None = None,
    group: int = -1,
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    group_size: tuple[int, int] | None = None,
) -> None:
    """Marshal one launch of `attention_kernel`; the public launchers validate first.

    `key`/`value` are the paged caches [blocks, page, kv_heads, D], or, when `block_table` is
    None, the new tokens' dense [tokens, kv_heads, D] (every sequence then has no context).
    `groups` is (seq_order, order_cu_q, group_bounds) from `classify_requests`. `group_size`,
    the (tokens, requests) of `group` where the host knows them exactly, sizes the grid for
    that group alone; otherwise it covers the whole batch.
    """
    num_tokens, num_heads, head_size = query.shape
    paged = block_table is not None
    num_kv_heads = key.shape[2] if paged else key.shape[1]
    queries_per_kv = num_heads // num_kv_heads
    queries_per_kv_pad = triton.next_power_of_2(queries_per_kv)
    if config.block_m != config.block_q * queries_per_kv_pad:
        raise ValueError(f"{config} does not pack {queries_per_kv_pad} query heads per KV head")
    num_seqs = seq_lens.shape[0]
    kv_fp8 = key.dtype in FP8_DTYPES
    ws = workspace if num_segments > 1 else None
    placeholder = query  # stands in for pointers that a disabled feature never reads
    seq_order, order_cu_q, group_bounds = groups if groups is not None else (placeholder,) * 3
    if paged:
        stride_k, stride_v = key.stride()[:3], value.stride()[:3]
    else:
        stride_k, stride_v = (
            (key.stride(0), 0, key.stride(1)),
            (value.stride(0), 0, value.stride(1)),
        )

    grid_tokens, grid_seqs = group_size or (num_tokens, num_seqs)
    grid = (num_query_blocks(grid_tokens, grid_seqs, config.block_q), num_kv_heads, num_segments)
    fill = 1
    if num_segments > 1:
        # A decode-shaped block holds one request's queries: requests x KV heads per slice.
        fill = fill_segments(
            grid_seqs * num_kv_heads, num_segments, device_num_sms(query.device), config.fill_waves
        )
    attention_kernel[grid](
        query, key, value, output,
        ws.partial_out if ws else placeholder,
        ws.partial_max if ws else placeholder,
        ws.partial_sum if ws else placeholder,
        query_start_loc, seq_lens, block_table if paged else placeholder,
        seq_order, order_cu_q, group_bounds,
        alibi_slopes if alibi_slopes is not None else placeholder,
        sinks if sinks is not None else placeholder,
        k_scale if kv_fp8 else placeholder,
        v_scale if kv_fp8 else placeholder,
        softmax_scale,
        softcap or 0.0,
        sliding_window or 0,
        num_seqs,
        fill,
        query.stride()[:2], output.stride()[:2], stride_k, stride_v,
        (block_table.stride(0),) if paged else (0,),
        ws.partial_out.stride()[:3] if ws else (0, 0, 0),
        ws.partial_max.stride()[:2] if ws else (0, 0),
        QUERIES_PER_KV=queries_per_kv,
        QUERIES_PER_KV_PAD=queries_per_kv_pad,
        HEAD_SIZE=head_size,
        HEAD_PAD=max(triton.next_power_of_2(head_size), 16),
        BLOCK_Q=config.block_q,
        BLOCK_M=config.block_m,
        TILE_N=config.tile_n,
        PAGE_SIZE=key.shape[1] if paged else 1,
        NUM_SEGMENTS=num_segments,
        MIN_SEGMENT_TILES=MIN_SEGMENT_TILES if num_segments > 1 else 1,
        SEGMENT_TILES=config.segment_tiles if num_segments > 1 else 1,
        GROUP=group,
        PAGED=paged,
        PAGE_LOOKAHEAD=paged and config.page_lookahead,
        KEYS_AS_ROWS=config.keys_as_rows,
        IS_CAUSAL=causal,
        USE_SLIDING_WINDOW=sliding_window is not None,
        USE_SOFTCAP=bool(softcap),
        USE_ALIBI=alibi_slopes is not None,
        USE_SINKS=sinks is not None,
        KV_FP8=kv_fp8,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
