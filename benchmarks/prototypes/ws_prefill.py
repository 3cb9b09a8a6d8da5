"""Prototype, not used by the backend: fresh causal prefills through TMA descriptors and Triton's
automatic warp specialisation on Hopper.

Why: our prefill runs at 0.67-0.74x FA3 (README), and the sm90 TTGIR of our kernel shows the QK
and PV dots waiting for each other with the softmax in between (`warp_group_dot_wait
pendings=0`). FA3 overlaps them with a producer warp group issuing TMA copies and two consumer
warp groups. Triton 3.6 can build that structure itself on sm90 (`add_hopper_warpspec`) for a
loop marked `tl.range(..., warp_specialize=True)` whose operands come from tensor descriptors:
compiled here for sm90 with 4 warps and 2 stages it gives one producer partition and two
consumer partitions of 64 rows each (12 warps, 168 registers, no spills). Whether it is faster
is a GPU question; `bench.py kernels --providers ws_prefill` answers it for the prefill cases.

Scope of the prototype: what the grouped route's dense prefill serves in the common case
(fresh prefills, causal, K/V of the new tokens as [tokens, kv heads, head size] with the last
dimension contiguous), a power-of-two head size and query heads per KV head, no sliding window,
soft cap, ALiBi, sinks or fp8. Every tile is masked (a single loop is what the pass handles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_portable_attn.kernels._common import LOG2E, num_query_blocks, online_softmax_step


@triton.jit(do_not_specialize=["num_tokens"])
def _ws_prefill_kernel(
    query_ptr,  # [num_tokens, num_heads, HEAD], heads contiguous ([tokens, heads * HEAD] in 2-D)
    key_ptr,  # [num_tokens, num_kv_heads, HEAD], likewise
    value_ptr,  # [num_tokens, num_kv_heads, HEAD], likewise
    output_ptr,  # [num_tokens, num_heads, HEAD]
    query_start_loc_ptr,  # [num_seqs + 1] int32
    block_seq_ptr,  # [grid] int32: each query block's sequence
    block_index_ptr,  # [grid] int32: the block's index within it (past its end if surplus)
    num_tokens,
    softmax_scale,
    stride_q,
    stride_k,
    stride_v,
    stride_o0,
    stride_o1,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    # One query head per program, BLOCK_M tokens (no GQA packing: a packed Q box would be
    # [BLOCK_M / group, group * HEAD], wider than TMA's 256 elements). Longest causal blocks
    # first, as in the product's kernel. Triton 3.6's sm90 warp specialisation gives up on a
    # kernel with a while loop (the product's `find_seq_idx`) and fails on an early return or
    # a 3-D descriptor, so the block -> sequence map comes precomputed, and a surplus program
    # runs an empty loop and stores nothing.
    q_block_idx = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // (NUM_HEADS // NUM_KV_HEADS)
    seq = tl.load(block_seq_ptr + q_block_idx)
    q_block = tl.load(block_index_ptr + q_block_idx)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # Keys of a causal block: up to its last query; none for a surplus program.
    key_hi = tl.where(q_block * BLOCK_M < q_len, tl.minimum(q_len, (q_block + 1) * BLOCK_M), 0)

    # Descriptors over the whole batch: a tile past the last token reads zeros, one that runs
    # into the next sequence is masked by position below.
    q_desc = tl.make_tensor_descriptor(
        query_ptr, shape=[num_tokens, NUM_HEADS * HEAD], strides=[stride_q, 1],
        block_shape=[BLOCK_M, HEAD],
    )  # fmt: skip
    k_desc = tl.make_tensor_descriptor(
        key_ptr, shape=[num_tokens, NUM_KV_HEADS * HEAD], strides=[stride_k, 1],
        block_shape=[TILE_N, HEAD],
    )  # fmt: skip
    v_desc = tl.make_tensor_descriptor(
        value_ptr, shape=[num_tokens, NUM_KV_HEADS * HEAD], strides=[stride_v, 1],
        block_shape=[TILE_N, HEAD],
    )  # fmt: skip
    q = q_desc.load([q_start + q_block * BLOCK_M, head * HEAD])
    query_pos = q_block * BLOCK_M + tl.arange(0, BLOCK_M)

    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in tl.range(0, key_hi, TILE_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([q_start + start, kv_head * HEAD])
        v = v_desc.load([q_start + start, kv_head * HEAD])
        scores = tl.dot(q, tl.trans(k))
        key_pos = start + tl.arange(0, TILE_N)
        scores = tl.where(key_pos[None, :] <= query_pos[:, None], scores, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, scores, softmax_scale * LOG2E, v, None)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    offs_d = tl.arange(0, HEAD)
    tl.store(
        output_ptr + (q_start + query_pos)[:, None] * stride_o0 + head * stride_o1
        + offs_d[None, :],
        out.to(output_ptr.dtype.element_ty),
        mask=(query_pos < key_hi)[:, None],
    )  # fmt: skip


def ws_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    softmax_scale: float,
    block_m: int = 128,
    tile_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    warp_specialize: bool = True,
) -> None:
    """Causal attention of fresh prefills over their own K/V, into `output` in place.

    Args:
        query: [num_tokens, num_heads, head_size]; key, value: [num_tokens, num_kv_heads,
            head_size]; heads and head dims contiguous, token strides 16-byte aligned (TMA's
            rules; vLLM's views of the QKV projection qualify).
        output: [num_tokens, num_heads, head_size].
        query_start_loc: [num_seqs + 1] int32; every sequence is a fresh prefill.
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    if head_size != triton.next_power_of_2(head_size) or num_heads % num_kv_heads:
        raise ValueError("the prototype needs a power-of-two head size and whole GQA groups")
    for t in (query, key, value):
        if t.stride(2) != 1 or t.stride(1) != head_size or (t.stride(0) * t.element_size()) % 16:
            raise ValueError("TMA here needs [tokens, heads, head] with heads contiguous and "
                             "16-byte aligned token strides")  # fmt: skip
    # The kernel builds its descriptors on the device, in global scratch from this allocator
    # (process-wide in Triton: acceptable for a benchmark prototype, not for the backend).
    triton.set_allocator(
        lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=query.device)
    )
    block_seq, block_index = _query_blocks(query_start_loc, num_tokens, block_m)
    grid = (block_seq.shape[0], num_heads)
    _ws_prefill_kernel[grid](
        query, key, value, output, query_start_loc, block_seq, block_index, num_tokens,
        softmax_scale,
        query.stride(0), key.stride(0), value.stride(0), output.stride(0), output.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD=head_size, BLOCK_M=block_m,
        TILE_N=tile_n, WARP_SPECIALIZE=warp_specialize, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip


def _query_blocks(
    query_start_loc: torch.Tensor, num_tokens: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query block's (sequence, index within it), for a grid sized from padded counts.

    Device-side torch ops only (no host sync). A block past the last one maps to the last
    sequence with an index past its blocks, so its program sees no keys and stores nothing.
    """
    num_seqs = query_start_loc.shape[0] - 1
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    blocks_end = torch.cumsum(torch.div(q_lens + block_m - 1, block_m, rounding_mode="floor"), 0)
    grid = num_query_blocks(num_tokens, num_seqs, block_m)
    block = torch.arange(grid, device=query_start_loc.device, dtype=blocks_end.dtype)
    seq = torch.searchsorted(blocks_end, block, right=True).clamp_(max=num_seqs - 1)
    first = torch.cat([blocks_end.new_zeros(1), blocks_end])[seq]
    return seq.to(torch.int32), (block - first).to(torch.int32)
