"""Random paged-attention batches for the tests: mixed decodes, extends and prefills.

A request is (query_len, context_len). The cache is allocated physically as NHD
[num_blocks, page_size, kv_heads, 2 * head_size], the way vLLM allocates it, and K/V are
strided views into it, so every test exercises non-contiguous cache strides. Pages are
drawn at random from the whole pool (shuffled block tables), and the cache holds random data
everywhere, so a kernel that reads the wrong page gets the wrong answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_size]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_size], the new tokens' K
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_size]
    kv_cache: torch.Tensor  # vLLM's logical view [num_blocks, kv_heads, page_size, 2 * head]
    key_cache: torch.Tensor  # [num_blocks, page_size, num_kv_heads, head_size] view
    value_cache: torch.Tensor  # same
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_table: torch.Tensor  # [num_reqs, max_pages] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 on padding tokens
    max_query_len: int
    max_seq_len: int
    num_actual_tokens: int  # tokens that belong to a request; the rest is padding

    @property
    def head_size(self) -> int:
        return self.query.shape[2]


def make_batch(
    requests: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    page_size: int,
    dtype: torch.dtype,
    device: str,
    num_padded_requests: int = 0,
    num_padding_tokens: int = 0,
    spare_blocks: int = 7,
    seed: int = 0,
) -> PagedBatch:
    """A batch whose caches already hold each request's context (not its new tokens).

    Padded requests get query_len 0, seq_len 0 and a block-table row of 0, as vLLM pads them;
    padding tokens get slot -1.
    """
    gen = torch.Generator().manual_seed(seed)
    q_lens = [q for q, _ in requests] + [0] * num_padded_requests
    seq_lens = [q + c for q, c in requests] + [0] * num_padded_requests
    pages_per_req = [-(-s // page_size) for s in seq_lens]
    num_blocks = sum(pages_per_req) + spare_blocks + 1  # block 0 is vLLM's reserved null block
    max_pages = max(max(pages_per_req), 1)

    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    for r, n in enumerate(pages_per_req):
        block_table[r, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]

    num_actual = sum(q_lens)
    num_tokens = num_actual + num_padding_tokens

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    physical = randn(num_blocks, page_size, num_kv_heads, 2 * head_size)
    query = randn(num_tokens, num_heads, head_size)
    key = randn(num_tokens, num_kv_heads, head_size)
    value = randn(num_tokens, num_kv_heads, head_size)

    slots = []
    for r, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(block_table[r, pos // page_size]) * page_size + pos % page_size)
    slot_mapping = torch.tensor(slots + [-1] * num_padding_tokens, dtype=torch.int64)

    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)

    physical = physical.to(device)
    kv_cache = physical.permute(0, 2, 1, 3)  # logical (blocks, heads, slots, 2D), NHD strides
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return PagedBatch(
        query=query.to(device),
        key=key.to(device),
        value=value.to(device),
        kv_cache=kv_cache,
        key_cache=key_cache,
        value_cache=value_cache,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        slot_mapping=slot_mapping.to(device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        num_actual_tokens=num_actual,
    )


def scatter_new_tokens(batch: PagedBatch) -> None:
    """Write the new tokens' K/V into the cache with plain indexing (the test's oracle)."""
    valid = batch.slot_mapping >= 0
    slots = batch.slot_mapping[valid]
    page_size = batch.key_cache.shape[1]
    blocks, offsets = slots // page_size, slots % page_size
    batch.key_cache[blocks, offsets] = batch.key[: len(valid)][valid].to(batch.key_cache.dtype)
    batch.value_cache[blocks, offsets] = batch.value[: len(valid)][valid].to(
        batch.value_cache.dtype
    )


def fp8_batch(
    batch: PagedBatch, fp8: torch.dtype, k_scale: float, v_scale: float, *, exact: bool
) -> PagedBatch:
    """`batch` with an fp8 cache laid out as vLLM allocates it: uint8 storage, NHD strides.

    exact=True makes every new K/V value an fp8 value times its scale, so quantizing it needs
    no rounding. Triton 3.6's interpreter rounds fp32->fp8 wrongly when rounding up crosses a
    power of two (1.9997 -> 1.0), so CPU runs need this to compare the write exactly.
    """
    half = batch.head_size
    physical = batch.kv_cache.permute(0, 2, 1, 3).float()
    quantized = torch.cat([physical[..., :half] / k_scale, physical[..., half:] / v_scale], -1)
    kv_cache = quantized.to(fp8).view(torch.uint8).permute(0, 2, 1, 3)
    key_cache, value_cache = kv_cache.view(fp8).transpose(1, 2).split(half, dim=-1)
    key, value = batch.key, batch.value
    if exact:
        key = ((key.float() / k_scale).to(fp8).float() * k_scale).to(key.dtype)
        value = ((value.float() / v_scale).to(fp8).float() * v_scale).to(value.dtype)
    return dataclasses.replace(
        batch,
        kv_cache=kv_cache,
        key_cache=key_cache,
        value_cache=value_cache,
        key=key,
        value=value,
    )


def fp8_written_caches(
    batch: PagedBatch, k_scale: float, v_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of an fp8 batch's caches after the step's write (x / scale), by plain indexing."""
    fp8 = batch.key_cache.dtype
    want_k, want_v = batch.key_cache.clone(), batch.value_cache.clone()
    valid = batch.slot_mapping >= 0
    slots = batch.slot_mapping[valid]
    page_size = batch.key_cache.shape[1]
    blocks, offsets = slots // page_size, slots % page_size
    want_k[blocks, offsets] = (batch.key[: len(valid)][valid].float() / k_scale).to(fp8)
    want_v[blocks, offsets] = (batch.value[: len(valid)][valid].float() / v_scale).to(fp8)
    return want_k, want_v
