"""Split-KV (flash-decoding) partial results and the kernel that merges them.

With few sequences, one program per (query block, KV head) leaves most SMs idle on long
contexts. The attention kernel then splits each sequence's keys into NUM_SEGMENTS slices and
writes, per (token, head, segment), the unnormalised output `acc`, the running max `m` (log2
units) and the sum `l` of exp2(score - m). Merging is the usual log-sum-exp rescale:
    out = sum_s exp2(m_s - M) * acc_s / sum_s exp2(m_s - M) * l_s,   M = max_s m_s.
A sequence too short for every segment leaves the last ones empty: they write only m = -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class SplitKVWorkspace:
    """Persistent fp32 scratch for split-KV partials.

    It is allocated once (by the metadata builder) and reused by every layer and step, so its
    addresses stay fixed under CUDA-graph replay.
    """

    partial_out: torch.Tensor  # [max_tokens, num_heads, max_segments, head_pad] fp32
    partial_max: torch.Tensor  # [max_tokens, num_heads, max_segments] fp32
    partial_sum: torch.Tensor  # [max_tokens, num_heads, max_segments] fp32

    @classmethod
    def allocate(
        cls,
        max_tokens: int,
        num_heads: int,
        head_size: int,
        max_segments: int,
        device: torch.device | str,
    ) -> SplitKVWorkspace:
        head_pad = max(triton.next_power_of_2(head_size), 16)
        shape = (max_tokens, num_heads, max_segments)
        return cls(
            partial_out=torch.empty(*shape, head_pad, dtype=torch.float32, device=device),
            partial_max=torch.empty(shape, dtype=torch.float32, device=device),
            partial_sum=torch.empty(shape, dtype=torch.float32, device=device),
        )

    @property
    def max_tokens(self) -> int:
        return self.partial_max.shape[0]

    def check_fits(self, num_tokens: int, num_heads: int, num_segments: int) -> None:
        """Raise unless a launch of this size fits the workspace."""
        max_tokens, heads, max_segments = self.partial_max.shape
        if num_tokens > max_tokens or num_heads != heads or num_segments > max_segments:
            raise ValueError(
                f"split-KV launch ({num_tokens} tokens, {num_heads} heads, {num_segments} "
                f"segments) exceeds the workspace ({max_tokens}, {heads}, {max_segments})"
            )
        if num_segments & (num_segments - 1):
            raise ValueError(f"num_segments must be a power of two, got {num_segments}")


@triton.jit(do_not_specialize=["num_seqs"])
def _merge_segments_kernel(
    output_ptr,  # [num_tokens, num_heads, head_size]
    partial_out_ptr,  # [max_tokens, num_heads, max_segments, HEAD_PAD] fp32
    partial_max_ptr,  # [max_tokens, num_heads, max_segments] fp32
    partial_sum_ptr,  # [max_tokens, num_heads, max_segments] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs,
    stride_o_token,
    stride_o_head,
    stride_po_token,
    stride_po_head,
    stride_po_seg,
    stride_pm_token,
    stride_pm_head,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    # Padding tokens past the last sequence belong to no attention program, so their partials
    # are stale; leave their output rows alone, as the unsplit path does.
    if token >= tl.load(query_start_loc_ptr + num_seqs):
        return
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_PAD)
    stat = token * stride_pm_token + head * stride_pm_head + offs_s
    m = tl.load(partial_max_ptr + stat)
    # A segment past a short sequence's last slice wrote only its max (-inf); its sum and
    # output partials are stale, so they are never read.
    written = m > float("-inf")
    seg_sum = tl.load(partial_sum_ptr + stat, mask=written, other=0.0)
    m_max = tl.max(m, axis=0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(weight * seg_sum, axis=0)
    acc = tl.load(
        partial_out_ptr + token * stride_po_token + head * stride_po_head
        + offs_s[:, None] * stride_po_seg + offs_d[None, :],
        mask=written[:, None],
        other=0.0,
    )  # fmt: skip
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        output_ptr + token * stride_o_token + head * stride_o_head + offs_d,
        out.to(output_ptr.dtype.element_ty),
        mask=offs_d < HEAD_SIZE,
    )


def merge_segments(
    output: torch.Tensor,
    workspace: SplitKVWorkspace,
    query_start_loc: torch.Tensor,
    num_segments: int,
) -> None:
    """Combine the first `num_segments` partials of every token into `output` in place.

    Args:
        output: [num_tokens, num_heads, head_size]; the attention kernel's destination.
        workspace: partials written by the attention kernel for these tokens.
        query_start_loc: [num_seqs + 1] int32; tokens at or past its last entry are skipped.
        num_segments: the segment count the attention kernel ran with.
    """
    num_tokens, num_heads, head_size = output.shape
    workspace.check_fits(num_tokens, num_heads, num_segments)
    _merge_segments_kernel[(num_tokens, num_heads)](
        output, workspace.partial_out, workspace.partial_max, workspace.partial_sum,
        query_start_loc, query_start_loc.shape[0] - 1,
        output.stride(0), output.stride(1),
        workspace.partial_out.stride(0), workspace.partial_out.stride(1),
        workspace.partial_out.stride(2),
        workspace.partial_max.stride(0), workspace.partial_max.stride(1),
        HEAD_SIZE=head_size,
        HEAD_PAD=workspace.partial_out.shape[3],
        NUM_SEGMENTS=num_segments,
    )  # fmt: skip
