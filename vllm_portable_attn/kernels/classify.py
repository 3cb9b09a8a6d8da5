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

`classify_on_host` is the same classification in numpy, for a host that knows the lengths: it
fills a host copy of the buffers, which then reach the device in one copy (the three buffers are
views of one packed tensor). The builder uses it every step where it can, because a Triton
launch costs tens of microseconds of host time; the kernel remains for the steps it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import triton
import triton.language as tl

GROUP_DECODE, GROUP_EXTEND, GROUP_PREFILL, GROUP_PADDING = range(4)
NUM_GROUPS = 4

#: (tokens, requests) of the decode, extend and prefill groups of one step.
GroupSizes = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


#: A torch tensor or a numpy array: the packed layout is sliced the same way on both.
ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

# Each buffer of the packed layout starts on a 16-byte boundary, so the kernels' pointers keep
# Triton's 16-byte divisibility specialisation, as separate allocations had it.
_ALIGN = 16 // 4  # int32 entries


def _aligned(num_entries: int) -> int:
    return -(-num_entries // _ALIGN) * _ALIGN


def packed_size(max_num_seqs: int) -> int:
    """Entries of the packed buffer for `max_num_seqs` requests (see `packed_fields`)."""
    return _aligned(NUM_GROUPS + 1) + _aligned(max_num_seqs + 1) + max_num_seqs


def packed_fields(packed: ArrayT, max_num_seqs: int) -> tuple[ArrayT, ArrayT, ArrayT]:
    """(seq_order, order_cu_q, group_bounds), as views of one flat int32 buffer laid out as

        group_bounds[NUM_GROUPS + 1] | order_cu_q[max_num_seqs + 1] | seq_order[max_num_seqs]

    each buffer starting 16-byte aligned. One layout for the device tensor and its host copies,
    so a single copy moves all three.
    """
    cu_q_start = _aligned(NUM_GROUPS + 1)
    order_start = cu_q_start + _aligned(max_num_seqs + 1)
    return (
        packed[order_start : order_start + max_num_seqs],
        packed[cu_q_start : cu_q_start + max_num_seqs + 1],
        packed[: NUM_GROUPS + 1],
    )


@dataclass
class RequestGroups:
    """Persistent buffers the classifier fills each step (fixed addresses for CUDA graphs).

    The three buffers are views of `packed` (layout in `packed_fields`), so a host-side
    classification reaches the device in one copy.
    """

    seq_order: torch.Tensor  # [max_num_seqs] int32, request ids sorted by group (stable)
    order_cu_q: torch.Tensor  # [max_num_seqs + 1] int32, cumulative query lengths in that order
    group_bounds: torch.Tensor  # [NUM_GROUPS + 1] int32, each group's first entry
    packed: torch.Tensor  # [packed_size(max_num_seqs)] int32, the storage of the three above

    @classmethod
    def allocate(cls, max_num_seqs: int, device: torch.device | str) -> RequestGroups:
        packed = torch.zeros(packed_size(max_num_seqs), dtype=torch.int32, device=device)
        seq_order, order_cu_q, group_bounds = packed_fields(packed, max_num_seqs)
        return cls(seq_order, order_cu_q, group_bounds, packed)

    @property
    def max_num_seqs(self) -> int:
        """The most requests a step may have."""
        return self.seq_order.shape[0]

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


def request_group_ids(
    q_lens: np.ndarray, seq_lens: np.ndarray, decode_threshold: int
) -> np.ndarray:
    """Each request's group (GROUP_*, int8), by the classifier's rule (module docstring): the
    one statement of it on the host, shared by `group_sizes` and `classify_on_host`."""
    # GROUP_DECODE is 0 and GROUP_EXTEND 1, so the comparison is the decode / extend split (a
    # cast costs less than np.where, and 8-bit keys sort by radix).
    group = (q_lens > decode_threshold).astype(np.int8)
    group[seq_lens <= q_lens] = GROUP_PREFILL  # no context
    group[q_lens == 0] = GROUP_PADDING
    return group


def group_sizes(q_lens: np.ndarray, seq_lens: np.ndarray, decode_threshold: int) -> GroupSizes:
    """The host's twin of the classifier: (tokens, requests) of each group of a batch with these
    query and total lengths (host arrays, one entry per request), by the same rule.

    For launchers that know the lengths on the host: an empty group need not launch, and a grid
    can cover its group alone. One pass of a few numpy operations, as it runs every step.
    """
    group = request_group_ids(q_lens, seq_lens, decode_threshold)
    requests = np.bincount(group, minlength=NUM_GROUPS).tolist()
    tokens = np.bincount(group, weights=q_lens, minlength=NUM_GROUPS).astype(np.int64).tolist()
    return _group_sizes(tokens, requests)


def _group_sizes(tokens: list[int], requests: list[int]) -> GroupSizes:
    """GroupSizes from per-group token and request counts (indexed by GROUP_*)."""
    return (
        (tokens[GROUP_DECODE], requests[GROUP_DECODE]),
        (tokens[GROUP_EXTEND], requests[GROUP_EXTEND]),
        (tokens[GROUP_PREFILL], requests[GROUP_PREFILL]),
    )


def classify_on_host(
    q_lens: np.ndarray,
    seq_lens: np.ndarray,
    decode_threshold: int,
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> GroupSizes:
    """`classify_requests` on the host: writes what `_classify_kernel` writes and returns what
    `group_sizes` returns.

    Why: the builder knows the lengths on the host, and a few numpy operations on arrays of a
    few hundred entries cost a fraction of a Triton launch's host time; the result then goes to
    the device in one asynchronous copy. It runs every step, so it stays a handful of numpy
    calls (`np.add.accumulate` rather than `np.cumsum`, whose wrapper costs more than the sum).

    Args:
        q_lens: [num_seqs] query lengths, in vLLM's batch order.
        seq_lens: [num_seqs] total key lengths (context + query).
        decode_threshold: the longest query that still counts as a decode.
        out: int32 host arrays (seq_order, order_cu_q, group_bounds), as `packed_fields` gives;
            like the kernel, this writes seq_order[:num_seqs], order_cu_q[:num_seqs + 1] and all
            of group_bounds, and nothing else.
    """
    seq_order, order_cu_q, group_bounds = out
    num_seqs = q_lens.shape[0]
    capacity = seq_order.shape[0]
    if num_seqs > capacity:
        raise ValueError(f"{num_seqs} requests exceed the classifier's capacity of {capacity}")
    group = request_group_ids(q_lens, seq_lens, decode_threshold)
    order = np.argsort(group, kind="stable")  # stable: batch order inside each group
    seq_order[:num_seqs] = order
    order_cu_q[0] = 0
    np.add.accumulate(q_lens[order], out=order_cu_q[1 : num_seqs + 1])
    # Five small ints: summed in Python, which costs less here than numpy's calls.
    bounds = [0]
    for count in np.bincount(group, minlength=NUM_GROUPS).tolist():
        bounds.append(bounds[-1] + count)
    group_bounds[:] = bounds
    # A group's tokens are the cumulative query lengths at its bounds, apart.
    cu_q = order_cu_q[bounds].tolist()
    return _group_sizes(
        tokens=[cu_q[g + 1] - cu_q[g] for g in range(NUM_GROUPS)],
        requests=[bounds[g + 1] - bounds[g] for g in range(NUM_GROUPS)],
    )
