"""TMA prefill variants (mask form, program order, persistent grid) for run.py; not product code.

MASK 4 (the diagonal tile after the loop) is the variant Triton 3.6's sm_90 pass rejected; it was
compiled only, never run.
"""

import triton
import triton.language as tl

from vllm_portable_attn.kernels._common import (
    LOG2E,
    find_seq_idx,
    first_block_of,
    online_softmax_step,
)


@triton.jit
def _tile(
    q_block_idx, head, query_desc, key_desc, value_desc, output_ptr, query_start_loc_ptr,
    seq_order_ptr, order_cu_q_ptr, group_bounds_ptr, softmax_scale, stride_o_token, stride_o_head,
    QUERIES_PER_KV: tl.constexpr, HEAD: tl.constexpr, BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr, GROUP: tl.constexpr, SEARCH_STEPS: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    kv_head = head // QUERIES_PER_KV
    lo = tl.load(group_bounds_ptr + GROUP)
    hi = tl.load(group_bounds_ptr + GROUP + 1)
    entry = find_seq_idx(order_cu_q_ptr, lo, hi, q_block_idx, BLOCK_M, SEARCH_STEPS)
    found = entry >= lo
    entry = tl.maximum(entry, lo)
    first_block = first_block_of(order_cu_q_ptr, lo, tl.load(order_cu_q_ptr + lo), entry, BLOCK_M)
    q_block = q_block_idx - first_block
    seq = tl.load(seq_order_ptr + entry, mask=found, other=0)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_len = tl.where(found, q_len, 0)
    block_end = tl.minimum(q_len, (q_block + 1) * BLOCK_M)
    key_hi = tl.where(q_block * BLOCK_M < q_len, block_end, 0)
    q = query_desc.load([q_start + q_block * BLOCK_M, head * HEAD])
    query_pos = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, TILE_N)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    loop_hi = key_hi
    if MASK == 4:
        loop_hi = tl.where(key_hi > 0, q_block * BLOCK_M, 0)
    for start in tl.range(0, loop_hi, TILE_N, warp_specialize=True):
        k = key_desc.load([q_start + start, kv_head * HEAD])
        v = value_desc.load([q_start + start, kv_head * HEAD])
        scores = tl.dot(q, tl.trans(k))
        if MASK == 0:
            key_pos = start + offs_n
            scores = tl.where(key_pos[None, :] <= query_pos[:, None], scores, float("-inf"))
        elif MASK == 2:
            limit = query_pos - start
            scores = tl.where(offs_n[None, :] <= limit[:, None], scores, float("-inf"))
        elif MASK == 3:
            limit = query_pos - start
            scores = scores + tl.where(offs_n[None, :] <= limit[:, None], 0.0, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, scores, softmax_scale * LOG2E, v, None)
    if MASK == 4:
        diag = q_block * BLOCK_M
        k = key_desc.load([q_start + diag, kv_head * HEAD])
        v = value_desc.load([q_start + diag, kv_head * HEAD])
        scores = tl.dot(q, tl.trans(k))
        limit = query_pos - diag
        scores = tl.where(offs_n[None, :] <= limit[:, None], scores, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, scores, softmax_scale * LOG2E, v, None)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    offs_d = tl.arange(0, HEAD)
    tl.store(
        output_ptr
        + (q_start + query_pos)[:, None] * stride_o_token
        + head * stride_o_head
        + offs_d[None, :],
        out.to(output_ptr.dtype.element_ty),
        mask=(query_pos < key_hi)[:, None],
    )


@triton.jit(do_not_specialize=["num_tokens", "num_blocks"])
def kern(
    query_ptr, key_ptr, value_ptr, output_ptr, query_start_loc_ptr, seq_order_ptr,
    order_cu_q_ptr, group_bounds_ptr, num_tokens, num_blocks, softmax_scale, stride_q, stride_k,
    stride_v, stride_o_token, stride_o_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr,
    HEAD: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, GROUP: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, MASK: tl.constexpr, ORDER: tl.constexpr,
    PERSISTENT: tl.constexpr = False,  # one program per SM, work items round-robin (ORDER 1)
):  # fmt: skip
    query_desc = tl.make_tensor_descriptor(
        query_ptr,
        shape=[num_tokens, NUM_HEADS * HEAD],
        strides=[stride_q, 1],
        block_shape=[BLOCK_M, HEAD],
    )
    key_desc = tl.make_tensor_descriptor(
        key_ptr,
        shape=[num_tokens, NUM_KV_HEADS * HEAD],
        strides=[stride_k, 1],
        block_shape=[TILE_N, HEAD],
    )
    value_desc = tl.make_tensor_descriptor(
        value_ptr,
        shape=[num_tokens, NUM_KV_HEADS * HEAD],
        strides=[stride_v, 1],
        block_shape=[TILE_N, HEAD],
    )
    if PERSISTENT:
        for work in range(tl.program_id(0), num_blocks * NUM_HEADS, tl.num_programs(0)):
            _tile(
                num_blocks - 1 - work // NUM_HEADS, work % NUM_HEADS, query_desc, key_desc,
                value_desc, output_ptr, query_start_loc_ptr, seq_order_ptr, order_cu_q_ptr,
                group_bounds_ptr, softmax_scale, stride_o_token, stride_o_head, QUERIES_PER_KV,
                HEAD, BLOCK_M, TILE_N, GROUP, SEARCH_STEPS, MASK,
            )  # fmt: skip
        return
    if ORDER == 0:  # product: (blocks, heads), blocks reversed
        q_block_idx = tl.num_programs(0) - 1 - tl.program_id(0)
        head = tl.program_id(1)
    else:  # 1-D, heads fastest, blocks reversed
        pid = tl.program_id(0)
        head = pid % NUM_HEADS
        q_block_idx = num_blocks - 1 - pid // NUM_HEADS
    _tile(
        q_block_idx,
        head,
        query_desc,
        key_desc,
        value_desc,
        output_ptr,
        query_start_loc_ptr,
        seq_order_ptr,
        order_cu_q_ptr,
        group_bounds_ptr,
        softmax_scale,
        stride_o_token,
        stride_o_head,
        QUERIES_PER_KV,
        HEAD,
        BLOCK_M,
        TILE_N,
        GROUP,
        SEARCH_STEPS,
        MASK,
    )
