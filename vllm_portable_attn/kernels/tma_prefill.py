"""Fresh causal prefills on Hopper: TMA tiles and Triton's automatic warp specialisation.

The grouped route's prefill group reads the new tokens' own K/V, dense and contiguous, which is
what TMA copies want. Marked `tl.range(..., warp_specialize=True)` and fed by tensor
descriptors, the key loop compiles on sm_90 into FA3's layout: one producer warp group issuing
the TMA copies and two consumer warp groups of 64 query rows each (12 warps, 168 registers, no
spills), so the QK and PV dots of one consumer overlap the other's softmax.

The grid is persistent: one program per SM, each taking (query block, head) work items in turns,
heads fastest and longest blocks first, alternating direction every round. A program builds its
descriptors once, and no program starts only to find a short block. H200, Llama-8B heads: in
one run of benchmarks/prototypes/tma_prefill_variants, against one program per block, 16 x 1k
477 -> 373 us and 1 x 2k 111 -> 95; the alternation then brought 16k back from the round-robin
4574 to 4404 us; against FA3 this kernel runs 1k-16k prompts at 0.84-0.93x (NOTES.md, session H).

What Triton 3.6's sm_90 pass accepts shapes this kernel: no early return and no `while` loop
anywhere (so `find_seq_idx` runs unrolled, a fixed number of halvings), no reduction before the
key loop (a vector search over the group's block starts failed the pass), one key loop with the
causal mask on every tile (an `if` for the diagonal tiles turns the specialisation off, and a
diagonal tile peeled off before or after the loop fails the pass; the mask costs about 6%: the
loop without it ran 8k in 1082 rather than 1150 us), 4 warps and 2 stages. A work item past the
group's blocks runs an empty loop and stores nothing. Query heads are not packed per KV head (a
packed Q box would be wider than TMA's 256 elements): one work item is one query head x BLOCK_M
tokens, and the heads of a GQA group, neighbours in the order, read the same K/V tiles from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from vllm_portable_attn.kernels._common import (
    LOG2E,
    device_num_sms,
    find_seq_idx,
    first_block_of,
    num_query_blocks,
    online_softmax_step,
)
from vllm_portable_attn.kernels.configs import (
    TMA_PREFILL_HEAD_SIZES,
    AttentionConfig,
    tma_prefill_config,
)


@triton.jit
def _attend_query_block(
    work,  # this program's work item: (query block, head), heads fastest; past the end: none
    num_blocks,
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
    NUM_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    GROUP: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    """One query block of one head, causal over its prefill's own keys, into `output`."""
    # The heads of a block are neighbours (a GQA group reads the same K/V tiles at about the
    # same time), and blocks run longest first (a short tail; surplus blocks come first).
    head = work % NUM_HEADS
    q_block_idx = num_blocks - 1 - work // NUM_HEADS
    kv_head = head // QUERIES_PER_KV

    # Which prefill, and which of its query blocks (the portable kernel's search, unrolled). A
    # work item past the end has a negative block index, which no entry holds.
    lo = tl.load(group_bounds_ptr + GROUP)
    hi = tl.load(group_bounds_ptr + GROUP + 1)
    entry = find_seq_idx(order_cu_q_ptr, lo, hi, q_block_idx, BLOCK_M, SEARCH_STEPS)
    found = entry >= lo
    entry = tl.maximum(entry, lo)
    first_block = first_block_of(order_cu_q_ptr, lo, tl.load(order_cu_q_ptr + lo), entry, BLOCK_M)
    q_block = tl.where(found, q_block_idx - first_block, 0)
    seq = tl.load(seq_order_ptr + entry, mask=found, other=0)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_len = tl.where(found, q_len, 0)
    # The keys of a causal block end at its last query; a surplus block has none.
    block_end = tl.minimum(q_len, (q_block + 1) * BLOCK_M)
    key_hi = tl.where(q_block * BLOCK_M < q_len, block_end, 0)

    # A tile that runs past the sequence reads the next one's tokens (masked by position
    # below) or, past the batch, zeros (TMA's bounds check).
    q = query_desc.load([q_start + q_block * BLOCK_M, head * HEAD])
    query_pos = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in tl.range(0, key_hi, TILE_N, warp_specialize=True):
        k = key_desc.load([q_start + start, kv_head * HEAD])
        v = value_desc.load([q_start + start, kv_head * HEAD])
        scores = tl.dot(q, tl.trans(k))
        key_pos = start + tl.arange(0, TILE_N)
        scores = tl.where(key_pos[None, :] <= query_pos[:, None], scores, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, scores, softmax_scale * LOG2E, v, None)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    offs_d = tl.arange(0, HEAD)
    tl.store(
        output_ptr + (q_start + query_pos)[:, None] * stride_o_token + head * stride_o_head
        + offs_d[None, :],
        out.to(output_ptr.dtype.element_ty),
        mask=(query_pos < key_hi)[:, None],
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_tokens", "num_blocks"])
def _tma_prefill_kernel(
    query_ptr,  # [num_tokens, num_heads, HEAD], heads contiguous ([tokens, heads * HEAD] in 2-D)
    key_ptr,  # [num_tokens, num_kv_heads, HEAD], the new keys, likewise
    value_ptr,  # [num_tokens, num_kv_heads, HEAD], the new values, likewise
    output_ptr,  # [num_tokens, num_heads, HEAD]
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_order_ptr,  # [capacity] int32, request ids sorted by group
    order_cu_q_ptr,  # [capacity + 1] int32, cumulative query lengths in that order
    group_bounds_ptr,  # [num_groups + 1] int32, each group's first entry in the order
    num_tokens,
    num_blocks,  # query blocks that cover the group (`num_query_blocks`)
    softmax_scale,
    stride_q,
    stride_k,
    stride_v,
    stride_o_token,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    GROUP: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # binary-search halvings that cover the classifier's capacity
):
    # Descriptors over the whole batch, built on the device once per program: with descriptors
    # passed from the host, the warp-specialised kernel hung on an H200 (Triton 3.6).
    query_desc = tl.make_tensor_descriptor(
        query_ptr, shape=[num_tokens, NUM_HEADS * HEAD], strides=[stride_q, 1],
        block_shape=[BLOCK_M, HEAD],
    )  # fmt: skip
    key_desc = tl.make_tensor_descriptor(
        key_ptr, shape=[num_tokens, NUM_KV_HEADS * HEAD], strides=[stride_k, 1],
        block_shape=[TILE_N, HEAD],
    )  # fmt: skip
    value_desc = tl.make_tensor_descriptor(
        value_ptr, shape=[num_tokens, NUM_KV_HEADS * HEAD], strides=[stride_v, 1],
        block_shape=[TILE_N, HEAD],
    )  # fmt: skip
    # Persistent: each program takes one work item per round. Work items shrink along the
    # order, so rounds alternate direction (a program early in one round is late in the next)
    # and every program gets about the same number of keys.
    num_programs = tl.num_programs(0)
    program = tl.program_id(0)
    for round_idx in range(tl.cdiv(num_blocks * NUM_HEADS, num_programs)):
        slot = tl.where(round_idx % 2 == 0, program, num_programs - 1 - program)
        _attend_query_block(
            round_idx * num_programs + slot, num_blocks, query_desc, key_desc, value_desc,
            output_ptr, query_start_loc_ptr, seq_order_ptr, order_cu_q_ptr, group_bounds_ptr,
            softmax_scale, stride_o_token, stride_o_head, NUM_HEADS, QUERIES_PER_KV, HEAD,
            BLOCK_M, TILE_N, GROUP, SEARCH_STEPS,
        )  # fmt: skip


def tma_prefill_fits(
    query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None
) -> bool:
    """Whether these tensors are in this kernel's scope: 16-bit, a TMA_PREFILL_HEAD_SIZES head
    size, whole GQA groups, and TMA's layout rules ([tokens, heads, head size] with heads and
    head dims contiguous, 16-byte aligned bases and token strides).

    vLLM's query / key / value (views of the fused QKV projection) meet the layout rules.
    """
    if key is None or value is None or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if query.shape[2] not in TMA_PREFILL_HEAD_SIZES or query.shape[1] % key.shape[1]:
        return False
    for t in (query, key, value):
        head_size = t.shape[2]
        if t.stride(2) != 1 or t.stride(1) != head_size:
            return False
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


def choose_tma_prefill(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    *,
    causal: bool,
    score_features: int,
    prefill_size: tuple[int, int] | None,
) -> AttentionConfig | None:
    """The TMA prefill's config if a step's fresh prefills take it, else None.

    They do when the prefill group is large enough for this GPU's row (`prefill_size`, the
    group's host-known (tokens, requests); None, as under CUDA-graph capture, means no), the
    attention is plain causal (`score_features` counts windows, soft caps, ALiBi and sinks), and
    the new tokens' K/V are given, unquantised (an fp8 cache's prefills must see its quantised
    keys) and in this kernel's scope (`tma_prefill_fits`).
    """
    if not causal or score_features or not prefill_size or key_cache.dtype != query.dtype:
        return None
    if not tma_prefill_fits(query, key, value):
        return None
    return tma_prefill_config(prefill_size[0], query.shape[1])


def tma_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    group: int,
    group_size: tuple[int, int],
    softmax_scale: float,
    config: AttentionConfig,
) -> None:
    """Causal attention of one group of fresh prefills over their own K/V, into `output`.

    Args:
        query: [num_tokens, num_heads, head_size]; key, value: [num_tokens, num_kv_heads,
            head_size], the new tokens' K/V; all three as `tma_prefill_fits` requires.
        output: [num_tokens, num_heads, head_size]; only the group's rows are written.
        groups: (seq_order, order_cu_q, group_bounds) from `classify_requests`; every request
            of `group` has no context.
        group_size: (tokens, requests) of `group`, exactly: the work items cover its blocks
            only.
        config: from `configs.tma_prefill_config` (block_q = block_m query tokens per program).
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    seq_order, order_cu_q, group_bounds = groups
    block_m = config.block_m

    _ensure_scratch_allocator(query.device)
    num_blocks = num_query_blocks(*group_size, block_m)
    grid = (min(num_blocks * num_heads, _persistent_programs(query.device)),)
    _tma_prefill_kernel[grid](
        query, key, value, output, query_start_loc, seq_order, order_cu_q, group_bounds,
        num_tokens, num_blocks, softmax_scale, query.stride(0), key.stride(0), value.stride(0),
        output.stride(0), output.stride(1),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        QUERIES_PER_KV=num_heads // num_kv_heads,
        HEAD=head_size,
        BLOCK_M=block_m,
        TILE_N=config.tile_n,
        GROUP=group,
        SEARCH_STEPS=seq_order.shape[0].bit_length(),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent grid: one per SM (a program's 208 KiB of shared memory leave
    room for no second one). Without a GPU, three, so that CPU tests run several rounds in both
    directions with a partial last one."""
    return device_num_sms(device) if device.type == "cuda" else 3


def _ensure_scratch_allocator(device: torch.device) -> None:
    """Give Triton an allocator for the descriptors the kernel builds in global scratch.

    Triton asks a process-wide (per-thread) allocator for that memory at every launch and has
    none by default. One set by someone else serves as well, so it is left alone; otherwise
    ours allocates through torch's caching allocator (inside a CUDA-graph capture, from the
    graph's pool, as any allocation there).
    """
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)
        )
