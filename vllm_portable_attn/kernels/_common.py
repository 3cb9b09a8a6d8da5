"""Triton helpers shared by the attention kernels.

The online softmax runs in base 2 (exp2 is one instruction; exp is exp2 plus a multiply), so
every score is multiplied by log2(e) before it meets the running maximum.
"""

import functools

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def first_block_of(
    cu_q_ptr,  # [n + 1] int32, cumulative query lengths of the sequences searched
    lo,
    lo_start,  # cu_q[lo]
    i,
    BLOCK_Q: tl.constexpr,
):
    """The index of entry i's first query block, counting blocks from entry lo's.

    With BLOCK_Q > 1 each entry owns ceil(q_len / BLOCK_Q) <= q_len // BLOCK_Q + 1 blocks, so
    one spare block is reserved per entry: (cu_q[i] - cu_q[lo]) // BLOCK_Q + (i - lo). Blocks of
    one query token need no spare, and the blocks are the tokens themselves.
    """
    start = tl.load(cu_q_ptr + i) - lo_start
    if BLOCK_Q > 1:
        start = start // BLOCK_Q + (i - lo)
    return start


def num_query_blocks(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Grid size along the query blocks: enough for any batch of these padded counts."""
    return num_tokens if block_q == 1 else num_tokens // block_q + num_seqs


@functools.lru_cache(maxsize=8)
def device_num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (CUs on ROCm) of `device`. Without a GPU, one: Triton's
    interpreter runs one program at a time, so there is nothing to fill (tests that exercise
    split-KV on the CPU choose their segment counts themselves)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@triton.jit
def find_seq_idx(
    cu_q_ptr,  # [n + 1] int32, cumulative query lengths of the sequences searched
    lo,
    hi,
    q_block_idx,
    BLOCK_Q: tl.constexpr,
    SEARCH_STEPS: tl.constexpr = 0,
):
    """The entry i in [lo, hi) whose query blocks contain block `q_block_idx`; lo - 1 if none.

    Entry i's blocks start at `first_block_of(i)`, which is non-decreasing in i, so a binary
    search finds the last entry whose start is <= the block. A grid of `num_query_blocks`
    blocks therefore covers any batch without a host sync.

    SEARCH_STEPS = 0 loops until the range is empty. A positive count unrolls that many halvings
    instead (enough when hi - lo < 2**SEARCH_STEPS): Triton 3.6's sm_90 warp specialisation
    silently gives up on a kernel that has a `while` loop (tma_prefill.py).
    """
    lo_start = tl.load(cu_q_ptr + lo)
    left = lo
    right = hi
    if SEARCH_STEPS == 0:
        while left < right:
            mid = (left + right) // 2
            if first_block_of(cu_q_ptr, lo, lo_start, mid, BLOCK_Q) <= q_block_idx:
                left = mid + 1
            else:
                right = mid
    else:
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (left + right) // 2
            searching = left < right
            go_right = first_block_of(cu_q_ptr, lo, lo_start, mid, BLOCK_Q) <= q_block_idx
            left = tl.where(searching & go_right, mid + 1, left)
            right = tl.where(searching & ~go_right, mid, right)
    return left - 1


@triton.jit
def tanh(x):
    """tanh through exp2; stable for large |x| because exp2 saturates to 0 or inf."""
    e = tl.exp2((2.0 * LOG2E) * x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def online_softmax_step(
    acc,  # [BLOCK_M, HEAD_PAD] fp32, unnormalised output so far
    m_i,  # [BLOCK_M] fp32, running max in log2 units
    l_i,  # [BLOCK_M] fp32, running sum of exp2(score - m_i)
    scores,  # [BLOCK_M, TILE_N] fp32, -inf where masked; times `scale` gives log2 units
    scale,  # > 0
    v,  # [TILE_N, HEAD_PAD]
    DOT_PRECISION: tl.constexpr,
):
    """Fold one tile of scores and values into the running (acc, m, l).

    The scale is applied inside the exponent's fused multiply-add, not as a separate pass over
    the tile: the row max of the raw scores times a positive scale is the max of the scaled
    scores, exactly. Rows with every score masked so far keep m = -inf; the max is then
    replaced by 0 so that exp2(-inf - 0) = 0 instead of NaN, which leaves such rows at
    acc = 0, l = 0.
    """
    m_new = tl.maximum(m_i, tl.max(scores, axis=1) * scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(tl.fma(scores, scale, -m_safe[:, None]))
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i
