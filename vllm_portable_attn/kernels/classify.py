"""Sort a batch's requests into decode / extend / prefill groups, on the device, in one launch.

A request is classified from its own lengths, never from its place in the batch (vLLM's V2
model runner puts decodes first and then sorts by query length, so a short fresh prompt can
precede a long chunked-prefill continuation):
    decode   q_len <= threshold and it has context (spec-verify steps of q 2..8 included)
    extend   q_len >  threshold and it has context (chunked prefill, prefix-cache hits)
    prefill  no context
    padding  q_len == 0 (vLLM's padded requests)
The result is a stable, group-sorted index list plus the cumulative query lengths in that order
and each group's first entry; the grouped kernels search their own slice of it. One program
handles the whole batch: a counting sort over four keys is a few prefix sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

GROUP_DECODE, GROUP_EXTEND, GROUP_PREFILL, GROUP_PADDING = range(4)
NUM_GROUPS = 4

#: (tokens, requests) of the decode, extend and prefill groups of one step.
GroupSizes = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class RequestGroups:
    """Persistent buffers the classifier fills each step (fixed addresses for CUDA graphs)."""

    seq_order: torch.Tensor  # [max_num_seqs] int32, request ids sorted by group (stable)
    order_cu_q: torch.Tensor  # [max_num_seqs + 1] int32, cumulative query lengths in that order
    group_bounds: torch.Tensor  # [NUM_GROUPS + 1] int32, each group's first entry

    @classmethod
    def allocate(cls, max_num_seqs: int, device: torch.device | str) -> RequestGroups:
        return cls(
            seq_order=torch.zeros(max_num_seqs, dtype=torch.int32, device=device),
            order_cu_q=torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device),
            group_bounds=torch.zeros(NUM_GROUPS + 1, dtype=torch.int32, device=device),
        )

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.seq_order, self.order_cu_q, self.group_bounds


@triton.jit(do_not_specialize=["num_seqs", "decode_threshold"])
def _classify_kernel(
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    seq_order_ptr,  # [>= num_seqs] int32, out
    order_cu_q_ptr,  # [>= num_seqs + 1] int32, out
    group_bounds_ptr,  # [NUM_GROUPS + 1] int32, out
    num_seqs,
    decode_threshold,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.arange(0, BLOCK)
    valid = idx < num_seqs
    start = tl.load(query_start_loc_ptr + idx, mask=valid, other=0)
    q_len = tl.load(query_start_loc_ptr + idx + 1, mask=valid, other=0) - start
    context = tl.load(seq_lens_ptr + idx, mask=valid, other=0) - q_len
    group = tl.where(q_len <= decode_threshold, 0, 1)  # decode / extend, if it has context
    group = tl.where(context <= 0, 2, group)  # prefill
    group = tl.where(q_len == 0, 3, group)  # padding
    group = tl.where(valid, group, NUM_GROUPS)  # past the batch: in no group

    # Counting sort: an entry's position is its group's offset plus its rank inside the group
    # (batch order, so the sort is stable); the cumulative query length at that position is the
    # group's token offset plus the exclusive prefix sum of q_len inside the group.
    position = tl.zeros([BLOCK], dtype=tl.int32)
    cu_q = tl.zeros([BLOCK], dtype=tl.int32)
    entries = 0
    tokens = 0
    tl.store(group_bounds_ptr, 0)
    for g in tl.static_range(NUM_GROUPS):
        member = (group == g).to(tl.int32)
        member_q = q_len * member
        in_group = group == g
        position = tl.where(in_group, entries + tl.cumsum(member, 0) - member, position)
        cu_q = tl.where(in_group, tokens + tl.cumsum(member_q, 0) - member_q, cu_q)
        entries += tl.sum(member, 0)
        tokens += tl.sum(member_q, 0)
        tl.store(group_bounds_ptr + g + 1, entries)
    tl.store(seq_order_ptr + position, idx, mask=valid)
    tl.store(order_cu_q_ptr + position, cu_q, mask=valid)
    tl.store(order_cu_q_ptr + num_seqs, tokens)


def classify_requests(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    groups: RequestGroups,
    decode_threshold: int,
) -> None:
    """Fill `groups` for this batch (see the module docstring). No host sync.

    Args:
        query_start_loc: [num_seqs + 1] int32 cumulative query lengths, in vLLM's batch order.
        seq_lens: [num_seqs] int32 total key lengths.
        groups: buffers sized for at least num_seqs requests.
        decode_threshold: the longest query that still counts as a decode.
    """
    num_seqs = seq_lens.shape[0]
    capacity = groups.seq_order.shape[0]
    if num_seqs > capacity:
        raise ValueError(f"{num_seqs} requests exceed the classifier's capacity of {capacity}")
    _classify_kernel[(1,)](
        query_start_loc, seq_lens, groups.seq_order, groups.order_cu_q, groups.group_bounds,
        num_seqs, decode_threshold,
        NUM_GROUPS=NUM_GROUPS,
        BLOCK=max(triton.next_power_of_2(capacity), 16),
    )  # fmt: skip


def group_sizes(q_lens: np.ndarray, seq_lens: np.ndarray, decode_threshold: int) -> GroupSizes:
    """The host's twin of the classifier: (tokens, requests) of each group of a batch with these
    query and total lengths (host arrays, one entry per request), by the same rule.

    For launchers that know the lengths on the host: an empty group need not launch, and a grid
    can cover its group alone. One pass of a few numpy operations, as it runs every step.
    """
    has_context = seq_lens > q_lens
    is_long = q_lens > decode_threshold
    group = np.where(has_context, np.where(is_long, GROUP_EXTEND, GROUP_DECODE), GROUP_PREFILL)
    group[q_lens == 0] = GROUP_PADDING
    requests = np.bincount(group, minlength=NUM_GROUPS).tolist()
    tokens = np.bincount(group, weights=q_lens, minlength=NUM_GROUPS).astype(np.int64).tolist()
    return (
        (tokens[GROUP_DECODE], requests[GROUP_DECODE]),
        (tokens[GROUP_EXTEND], requests[GROUP_EXTEND]),
        (tokens[GROUP_PREFILL], requests[GROUP_PREFILL]),
    )
