"""Write the new tokens' K and V into the paged cache.

Our own kernel rather than vLLM's writer: it keeps the kernel package free of vLLM (so it runs
under the interpreter and compiles for any target on its own), it takes any cache strides, and
its fp8 convention (store x / scale, read back cache * scale) is defined next to the kernels
that read it. tests/test_cache_write.py checks it against a plain scatter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    key_cache_ptr,  # [num_blocks, page_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, page_size, num_kv_heads, head_size]
    slot_mapping_ptr,  # [num_tokens] int64, -1 for padding
    k_scale_ptr,  # [] fp32 (QUANTIZE)
    v_scale_ptr,  # [] fp32 (QUANTIZE)
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    QUANTIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    # One program moves a [BLOCK] slice of the token's flattened (head, dim) row.
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    head = offs // HEAD_SIZE
    dim = offs % HEAD_SIZE
    mask = offs < NUM_KV_HEADS * HEAD_SIZE
    k = tl.load(key_ptr + token * stride_k_token + head * stride_k_head + dim, mask=mask)
    v = tl.load(value_ptr + token * stride_v_token + head * stride_v_head + dim, mask=mask)
    if QUANTIZE:
        k = k.to(tl.float32) / tl.load(k_scale_ptr)
        v = v.to(tl.float32) / tl.load(v_scale_ptr)
    k_dst = key_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
    v_dst = value_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
    tl.store(k_dst + head * stride_kc_head + dim, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + head * stride_vc_head + dim, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter each token's K/V into its cache slot; slots < 0 (padding) are skipped.

    Args:
        key, value: [num_tokens, num_kv_heads, head_size], at least len(slot_mapping) tokens.
        key_cache, value_cache: [num_blocks, page_size, num_kv_heads, head_size] views with any
            strides (last dim contiguous). An fp8 cache stores x / scale.
        slot_mapping: [n] int64, slot = block * page_size + offset; the first n tokens are written.
        k_scale, v_scale: 0-dim fp32 scales, required for fp8 caches.
    """
    num_tokens = slot_mapping.shape[0]
    _, num_kv_heads, head_size = key.shape
    if key.shape[0] < num_tokens or value.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"key {tuple(key.shape)} / value {tuple(value.shape)} do not cover {num_tokens} slots"
        )
    if key_cache.shape[2:] != (num_kv_heads, head_size) or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"cache shape {tuple(key_cache.shape)} does not match key {tuple(key.shape)}"
        )
    quantize = key_cache.element_size() == 1
    if quantize and (k_scale is None or v_scale is None):
        raise ValueError("an fp8 KV cache needs k_scale and v_scale")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or key_cache.stride(-1) != 1:
        raise ValueError("the head dimension of key, value and caches must be contiguous")
    if num_tokens == 0:
        return
    row = num_kv_heads * head_size
    block = min(triton.next_power_of_2(row), 1024)
    grid = (num_tokens, triton.cdiv(row, block))
    _write_kv_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping,
        k_scale if quantize else slot_mapping,
        v_scale if quantize else slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        PAGE_SIZE=key_cache.shape[1],
        BLOCK=block,
        QUANTIZE=quantize,
    )  # fmt: skip
