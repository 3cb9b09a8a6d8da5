"""Compile every launch a layer's steps can take before serving starts, not at the first prompt.

Why: vLLM 0.26's warm-up runs prompts of two tokens and decodes, and its CUDA-graph capture one
token per request, so without this the prefill-shaped launches (the unified prefill tile, the
grouped extend and prefill tiles, the TMA prefill, the classifier of the unified route's TMA
steps) and most spec-verify tiles first compile inside a served request (vLLM's JIT monitor
then warns "Triton kernel JIT compilation during inference"; NOTES.md, session F).

How: the first eager step of each layer (which vLLM runs in its warm-up, before the monitor
starts) also runs the layer's attention once per *step shape* it can later meet, under
`kernels.compile_only`: the same dispatch code and the same tensors as the real step, only the
host-side facts that pick the launches replaced (the longest query, the split-KV segment count
and whether its grid is narrow, whether the step is classified and how large its fresh prefills
are). The tensors' strides and alignments are then exactly those of later steps, which is what
Triton's specialisations are keyed on; nothing is launched, so their contents do not matter.
The compiles run side by side on a thread pool (`COMPILE_THREADS`), since each engine start
with a cold Triton cache waits for them.

Which shapes: each query length up to the decode bound (every spec-verify tile) and one longer
(the prefill-shaped tiles), each with every segment count the builder can choose (over a narrow
grid and a wide one where both occur); on a GPU with the TMA prefill, each of those again as a
classified step whose fresh prefills reach its minimum. Layer features (windows, soft caps, fp8
caches, KV sharing) are the layer's own, so the dispatch leaves out what the layer never
launches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vllm_portable_attn._compat import get_logger
from vllm_portable_attn.kernels import MAX_DECODE_QUERY_LEN, RequestGroups, classify_requests
from vllm_portable_attn.kernels.compile_only import CompileCount, compile_only

if TYPE_CHECKING:
    from vllm_portable_attn.plan import PortableAttentionMetadata

logger = get_logger(__name__)

# Threads that compile a layer's specialisations side by side (compile_only): one per core
# this process may run on, at most 8 (a step shape set has about 25 specialisations, and
# tensor-parallel workers on one host each run their own precompile at the same time).
COMPILE_THREADS = min(
    8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)


@dataclass(frozen=True)
class PrecompilePlan:
    """What a builder knows about the launches its steps can take (fixed at its start)."""

    # Every (split-KV segment count, narrow grid) pair `build` can choose, (1, False) included.
    splits: tuple[tuple[int, bool], ...]
    # Fresh-prefill tokens of a step that takes the TMA prefill; None where no step does.
    tma_prefill_tokens: int | None
    request_groups: RequestGroups  # the builder's classifier buffers


@dataclass(frozen=True)
class StepShape:
    """The host-side facts of a step that decide which kernel specialisations it launches."""

    max_query_len: int
    num_segments: int
    classified: bool  # sorted into request groups (the grouped route, or a TMA step)
    prefill_tokens: int | None = None  # fresh-prefill tokens, where they decide (TMA steps)
    narrow_split: bool = False  # a split over few requests (the *_split_narrow rows)


def step_shapes(plan: PrecompilePlan, route: str) -> list[StepShape]:
    """Every step shape a builder with this plan can hand a layer on `route`."""
    shapes = []
    for max_query_len in range(1, MAX_DECODE_QUERY_LEN + 2):
        splits = plan.splits if max_query_len <= MAX_DECODE_QUERY_LEN else ((1, False),)
        shapes += [
            StepShape(max_query_len, segments, route == "grouped", narrow_split=narrow)
            for segments, narrow in splits
        ]
        if plan.tma_prefill_tokens is not None:
            shapes.append(StepShape(max_query_len, 1, True, plan.tma_prefill_tokens))
    return shapes


def precompile_step_shapes(
    attend: Callable[[PortableAttentionMetadata], None],
    md: PortableAttentionMetadata,
    plan: PrecompilePlan,
    threads: int = COMPILE_THREADS,
) -> CompileCount:
    """Compile (not run) every launch `attend` makes for each of the plan's step shapes, on
    up to `threads` threads, and say how many launches and compiles that took.

    `attend(md)` must run one layer's attention for `md` with this step's tensors, as the
    layer's forward does. `md` is a real step's metadata; the shapes change only its host-side
    facts.
    """
    started = time.perf_counter()
    shapes = step_shapes(plan, md.route)
    with compile_only(threads) as count:
        # The unified route's TMA steps are classified in the builder, outside any layer.
        if plan.tma_prefill_tokens is not None:
            classify_requests(
                md.query_start_loc, md.seq_lens, plan.request_groups, MAX_DECODE_QUERY_LEN
            )
        for shape in shapes:
            num_tokens = md.num_actual_tokens
            if shape.num_segments > 1:  # a split step fits the workspace (there is one then)
                num_tokens = min(num_tokens, md.workspace.max_tokens)
            group_sizes = None  # every group over the whole batch, as in a capture
            if shape.prefill_tokens is not None:
                # Every group, the TMA prefill's size, and a decode group whose longest query is
                # the shape's (grouped.py picks the decode group's tile from its size).
                group_sizes = (
                    (shape.max_query_len, 1),
                    (num_tokens, 1),
                    (shape.prefill_tokens, 1),
                )
            attend(
                replace(
                    md,
                    num_actual_tokens=num_tokens,
                    max_query_len=shape.max_query_len,
                    num_segments=shape.num_segments,
                    narrow_split=shape.narrow_split,
                    request_groups=plan.request_groups if shape.classified else None,
                    group_sizes=group_sizes,
                )
            )
    seconds = time.perf_counter() - started
    if count.compiled:
        logger.info(
            "vllm_portable_attn: compiled %d kernel specialisations (%d launches of %d step "
            "shapes of a layer) in %.1f s with %d compile threads, before serving",
            count.compiled,
            count.launches,
            len(shapes),
            seconds,
            count.threads,
        )
    return count
