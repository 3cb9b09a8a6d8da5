"""One check shared by the kernel tests: run a provider and the fp64 reference on one batch.

Outputs are poisoned with NaN first (so an unwritten row fails), split-KV scratch too, and the
padding tokens' rows must come back untouched.
"""

from __future__ import annotations

import torch
from paged_batch import PagedBatch, scatter_new_tokens

from vllm_portable_attn.kernels import (
    MAX_DECODE_QUERY_LEN,
    MAX_SEGMENTS,
    MAX_SPLIT_TOKENS,
    GroupSizes,
    RequestGroups,
    SplitKVWorkspace,
    classify_requests,
    group_sizes,
    grouped_attention,
    unified_attention,
)
from vllm_portable_attn.reference import paged_attention_reference

# Kernel error against an fp64 reference. fp16/bf16 round P and the output once each.
TOLERANCE = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def host_group_sizes(batch: PagedBatch) -> GroupSizes:
    """Each group's (tokens, requests), as the plan reads them from host lengths."""
    q_lens = batch.query_start_loc.diff().cpu().numpy()
    return group_sizes(q_lens, batch.seq_lens.cpu().numpy(), MAX_DECODE_QUERY_LEN)


def run_and_check(
    batch: PagedBatch,
    *,
    provider: str = "unified",
    num_segments: int = 1,
    narrow_split: bool = False,
    fp8: torch.dtype | None = None,
    tma_prefill: bool = True,
    **features: object,
) -> None:
    """Run `provider` ("unified" or "grouped") and the reference; compare the real tokens.

    fp8: an fp8 type (torch.float8_e4m3fn, torch.float8_e5m2, ...) to quantize the cache to,
    x / scale with per-tensor scales as the backend stores it; None keeps the batch's dtype.
    tma_prefill: False keeps the grouped route's fresh prefills off the TMA kernel.
    """
    scatter_new_tokens(batch)  # the grouped route's prefills read the new K/V directly
    key_cache, value_cache, scales = batch.key_cache, batch.value_cache, {}
    if fp8 is not None:
        scales = dict(
            k_scale=torch.tensor(0.5, device=key_cache.device),
            v_scale=torch.tensor(0.25, device=key_cache.device),
        )
        key_cache = (key_cache.float() / scales["k_scale"]).to(fp8)
        value_cache = (value_cache.float() / scales["v_scale"]).to(fp8)
    workspace = None
    if num_segments > 1:
        workspace = SplitKVWorkspace.allocate(
            MAX_SPLIT_TOKENS, batch.query.shape[1], batch.head_size, MAX_SEGMENTS,
            batch.query.device,
        )  # fmt: skip

    paged = (key_cache, value_cache)
    lengths = (batch.query_start_loc, batch.seq_lens, batch.block_table)
    common = dict(
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
        softmax_scale=batch.head_size**-0.5,
        **scales,
        **features,
    )
    split = dict(num_segments=num_segments, workspace=workspace, narrow_split=narrow_split)
    ref = torch.full_like(batch.query, float("nan"), dtype=torch.float64)
    paged_attention_reference(batch.query, *paged, ref, *lengths, compute_dtype=torch.float64,
                              **common)  # fmt: skip
    if provider == "unified":
        _poison(workspace)
        out = torch.full_like(batch.query, float("nan"))
        unified_attention(batch.query, *paged, out, *lengths, **split, **common)
        _check(out, ref, batch)
    elif provider == "grouped":
        groups = RequestGroups.allocate(batch.seq_lens.shape[0] + 3, batch.query.device)
        groups.seq_order.fill_(-7)  # poison: every real entry must be overwritten
        classify_requests(batch.query_start_loc, batch.seq_lens, groups, MAX_DECODE_QUERY_LEN)
        # An eager step's launches (grids sized per group from host lengths, the TMA prefill
        # where it applies), then a capture's (every group over the whole batch's grid).
        for sizes in (host_group_sizes(batch), None):
            _poison(workspace)
            out = torch.full_like(batch.query, float("nan"))
            grouped_attention(batch.query, batch.key, batch.value, *paged, out, *lengths, groups,
                              group_sizes=sizes, allow_tma_prefill=tma_prefill,
                              **split, **common)  # fmt: skip
            _check(out, ref, batch)
    else:
        raise ValueError(f"unknown provider {provider!r}")


def _poison(workspace: SplitKVWorkspace | None) -> None:
    """NaN in the split-KV scratch, so a partial the merge reads but no program wrote fails."""
    if workspace is not None:
        for scratch in (workspace.partial_out, workspace.partial_max, workspace.partial_sum):
            scratch.fill_(float("nan"))


def _check(out: torch.Tensor, ref: torch.Tensor, batch: PagedBatch) -> None:
    """The real tokens' rows against the reference; padding tokens' rows untouched (NaN)."""
    n = batch.num_actual_tokens
    got, want = out[:n].double(), ref[:n]
    assert not got.isnan().any(), "kernel left real output rows unwritten (NaN)"
    err = (got - want).abs().max().item()
    torch.testing.assert_close(
        got, want, **TOLERANCE[batch.query.dtype], msg=lambda m: f"max abs err {err:.3g}\n{m}"
    )
    # Padding tokens belong to no request; the kernel must not write them.
    assert out[n:].isnan().all(), "kernel wrote output rows of padding tokens"
