#!/usr/bin/env python3
"""One benchmark CLI for vllm_portable_attn.

    python3 benchmarks/bench.py kernels [--providers portable,triton_attn,fa3] [--cases baseline]
    python3 benchmarks/bench.py e2e [--backends CUSTOM,FLASH_ATTN,TRITON_ATTN] [--quick]
    python3 benchmarks/bench.py kernels --list-cases
    python3 benchmarks/bench.py plan [--routes unified,grouped]   (K7: see plan_overhead.py)
    python3 benchmarks/bench.py precompile [--threads 1,8]       (see precompile_time.py)

``kernels`` times paged attention kernels side by side on Llama-3.1-8B heads (32 query / 8 KV
heads, head size 128, bf16, paged KV in blocks of 16, vLLM's NHD layout with K and V packed in
one tensor), checks every provider's output before timing it, and measures the GPU's copy
bandwidth and bf16 GEMM throughput in the same run so each kernel is reported as a fraction of
a *measured* ceiling. ``e2e`` measures vLLM ``LLM.generate`` throughput per attention backend,
one engine per child process; its ``latency`` workload times one small batch (median of
several runs), as ``vllm bench latency`` does. See benchmarks/NOTES.md for the method.

Every result is one JSON row (``--out results.jsonl``, appended) stamped with the GPU, versions,
git commit and time; a short table goes to stdout, ending with one ``SUMMARY:`` line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (needs the line above; also puts the repo root on sys.path)

K = 1024

# ============================================================================================
# Kernel cases
# ============================================================================================


@dataclass(frozen=True)
class Case(C.BatchLengths):
    """One batch shape: ``seq_lens`` are total key lengths (cached context + the new tokens),
    which is what vLLM passes as ``seq_lens``; the queries are the last ``q_lens`` positions."""

    id: str
    group: str  # decode | spec | prefill | extend | mixed
    q_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    baseline: bool = False


def _decode(b: int, ctx: int, baseline: bool = False) -> Case:
    return Case(f"decode_b{b}_ctx{C.count_label(ctx)}", "decode", (1,) * b, (ctx,) * b, baseline)


def _spec(q: int, b: int, ctx: int, baseline: bool = False) -> Case:
    return Case(f"spec_q{q}_b{b}_ctx{C.count_label(ctx)}", "spec", (q,) * b, (ctx,) * b, baseline)


def _prefill(b: int, n: int, baseline: bool = False) -> Case:
    return Case(f"prefill_b{b}_{C.count_label(n)}", "prefill", (n,) * b, (n,) * b, baseline)


def _extend(b: int, q: int, ctx: int, baseline: bool = False) -> Case:
    # "q 512 over ctx 8k": 8k tokens already cached, 512 new ones, so seq_len = ctx + q.
    return Case(
        f"extend_b{b}_q{q}_ctx{C.count_label(ctx)}", "extend", (q,) * b, (ctx + q,) * b, baseline
    )


def _mixed(n_pre: int, pre_len: int, n_dec: int, dec_ctx: int, baseline: bool = False) -> Case:
    # vLLM's model runner V2 puts decode-like requests first, then ascending query length.
    q = (1,) * n_dec + (pre_len,) * n_pre
    kv = (dec_ctx,) * n_dec + (pre_len,) * n_pre
    cid = f"mixed_{n_pre}p{C.count_label(pre_len)}_{n_dec}d{C.count_label(dec_ctx)}"
    return Case(cid, "mixed", q, kv, baseline)


# Exactly the rows of the kernel-level baseline table in shared/docs/performance.md, in order.
BASELINE_CASES: list[Case] = [
    _decode(1, 32 * K, True),
    _decode(4, 32 * K, True),
    _decode(8, 16 * K, True),
    _decode(64, 4 * K, True),
    _decode(128, 2 * K, True),
    _decode(64, 8 * K, True),
    _spec(4, 32, 8 * K, True),
    _prefill(1, 8 * K, True),
    _prefill(4, 4 * K, True),
    _prefill(16, 1 * K, True),
    _extend(4, 512, 8 * K, True),
    _mixed(2, 2 * K, 32, 1 * K, True),
]


def _sweep_cases(max_kv_tokens: int) -> list[Case]:
    """The wider sweep behind the goals K1-K6, trimmed to a KV footprint that fits one GPU."""
    cases: list[Case] = []
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for ctx in (1, 2, 4, 8, 16, 32, 64, 128):
            if b * ctx * K <= max_kv_tokens:
                cases.append(_decode(b, ctx * K))
    for q in (2, 4, 8):
        for b in (1, 8, 32):
            for ctx in (8, 32, 64):
                if b * ctx * K <= max_kv_tokens:
                    cases.append(_spec(q, b, ctx * K))
    for b, n in ((1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (4, 4), (16, 1)):
        cases.append(_prefill(b, n * K))
    for q in (256, 512, 1024, 2048):
        for ctx in (4, 8, 16, 32):
            cases.append(_extend(4, q, ctx * K))
    cases.append(_mixed(2, 2 * K, 32, 1 * K))
    cases.append(_mixed(1, 4 * K, 64, 4 * K))
    cases.append(_mixed(4, 1 * K, 128, 2 * K))
    return cases


GROUPS = ("decode", "spec", "prefill", "extend", "mixed")

# Tiny, deliberately uneven batches (lengths not multiples of the block size, several sequences
# of different lengths): a quick sanity run of the harness and the kernels, also on the CPU
# through Triton's interpreter (--device cpu). Not part of 'all'.
SMOKE_CASES: list[Case] = [
    Case("smoke_decode", "decode", (1, 1, 1), (37, 100, 16)),
    Case("smoke_spec", "spec", (3, 3), (50, 64)),
    Case("smoke_prefill", "prefill", (40, 17), (40, 17)),
    Case("smoke_extend", "extend", (20, 9), (45, 70)),
    Case("smoke_mixed", "mixed", (1, 1, 33), (70, 20, 50)),
]


def select_cases(spec: str, max_kv_tokens: int) -> list[Case]:
    """Resolve ``--cases``: comma-separated 'baseline', 'all', group names, or case ids."""
    sweep = _sweep_cases(max_kv_tokens)
    by_id = {c.id: c for c in sweep}
    for c in BASELINE_CASES + SMOKE_CASES:
        by_id.setdefault(c.id, c)
    chosen: dict[str, Case] = {}
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token == "baseline":
            picked = BASELINE_CASES
        elif token == "smoke":
            picked = SMOKE_CASES
        elif token == "all":
            picked = BASELINE_CASES + sweep
        elif token in GROUPS:
            picked = [c for c in BASELINE_CASES + sweep if c.group == token]
        elif token in by_id:
            picked = [by_id[token]]
        else:
            raise SystemExit(f"unknown case {token!r}; see --list-cases")
        for c in picked:
            chosen.setdefault(c.id, c)
    return list(chosen.values())


# ============================================================================================
# Kernel inputs and providers
# ============================================================================================


@dataclass
class Geometry:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16
    dtype_name: str = "bfloat16"

    @property
    def dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def elem_bytes(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype_name]


class Inputs:
    """Device tensors for one case, in ``copies`` independent sets so that consecutive timed
    calls touch different memory (matters for ``--cudagraph``, which does not flush L2; plain
    ``do_bench`` flushes L2 before every call anyway)."""

    def __init__(
        self,
        case: Case,
        geo: Geometry,
        copies: int,
        seed: int,
        device: str,
        shuffle_pages: bool = True,
    ) -> None:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(seed)
        torch.manual_seed(seed)
        bs = geo.block_size
        blocks_per_seq = [math.ceil(kv / bs) for kv in case.seq_lens]
        blocks_per_copy = sum(blocks_per_seq)
        max_blocks = max(blocks_per_seq)
        self.case, self.geo, self.copies = case, geo, copies
        # Block 0 is vLLM's reserved null block: never handed to a sequence here either.
        self.num_blocks = blocks_per_copy * copies + 1
        d = geo.head_size
        # vLLM's physical NHD cache: [blocks, block_size, kv_heads, 2 * head_size], K then V.
        self.kv_cache = torch.randn(
            (self.num_blocks, bs, geo.num_kv_heads, 2 * d), dtype=geo.dtype, device=device
        )
        self.key_cache = self.kv_cache[..., :d]
        self.value_cache = self.kv_cache[..., d:]
        # Shuffled block ids, disjoint between copies: pages of a sequence are scattered, as
        # in a long-running server. Contiguous ids isolate the cost of that scatter.
        perm = (torch.randperm(self.num_blocks - 1, generator=gen) + 1).to(torch.int32)
        if not shuffle_pages:
            perm = torch.arange(1, self.num_blocks, dtype=torch.int32)
        self.block_tables = []
        self.block_lists: list[list[torch.Tensor]] = []  # per copy, per seq: its block ids
        pos = 0
        for _ in range(copies):
            bt = torch.zeros((case.num_reqs, max_blocks), dtype=torch.int32)
            per_seq = []
            for i, nb in enumerate(blocks_per_seq):
                ids = perm[pos : pos + nb]
                pos += nb
                bt[i, :nb] = ids
                per_seq.append(ids)
            self.block_tables.append(bt.to(device))
            self.block_lists.append(per_seq)
        self.query = [
            torch.randn((case.num_tokens, geo.num_heads, d), dtype=geo.dtype, device=device)
            for _ in range(copies)
        ]
        qsl = [0]
        for q in case.q_lens:
            qsl.append(qsl[-1] + q)
        self.qsl_list = qsl
        self.query_start_loc = torch.tensor(qsl, dtype=torch.int32, device=device)
        self.seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32, device=device)
        self.scale = d**-0.5
        self.device = device

    def new_outputs(self) -> list[Any]:
        import torch

        return [torch.zeros_like(q) for q in self.query]


ProviderFn = Callable[[int, Any], None]  # (copy index, output tensor) -> None


def _split_policy(inp: Inputs, args: argparse.Namespace) -> tuple[int, Any, bool]:
    """Our split-KV segment count, workspace and grid width (narrow or not), chosen as the
    metadata builder chooses them."""
    from vllm_portable_attn.kernels import (
        MAX_SEGMENTS,
        MAX_SPLIT_TOKENS,
        SplitKVWorkspace,
        choose_split,
    )

    case, geo = inp.case, inp.geo
    segs, narrow = choose_split(
        case.num_tokens, case.num_reqs, case.max_query_len, geo.num_kv_heads, _num_sms(inp.device)
    )
    # --segments forces the count; the width stays the policy's (a batch the policy leaves
    # unsplit is never narrow: it has many requests or prefill-shaped tiles).
    segs = args.segments or segs
    ws = None
    if segs > 1:
        # Sized like the metadata builder sizes it: once, for the largest split batch.
        ws = SplitKVWorkspace.allocate(
            max(MAX_SPLIT_TOKENS, case.num_tokens), geo.num_heads, geo.head_size,
            max(MAX_SEGMENTS, segs), inp.device,
        )  # fmt: skip
    return segs, ws, narrow


def _parse_config(spec: str, inp: Inputs, num_segments: int, narrow_split: bool) -> Any:
    """'BMxTNxWxS' (rows per program, keys per tile, warps, stages) -> the AttentionConfig our
    table gives this launch with that tile instead; the rest (key layout, split slices) is the
    table's."""
    import dataclasses

    import triton

    from vllm_portable_attn.kernels.configs import (
        attention_config,
        launch_shape,
        uses_page_lookahead,
    )
    from vllm_portable_attn.kernels.unified import head_pad

    block_m, tile_n, warps, stages = (int(x) for x in spec.split("x"))
    case, geo = inp.case, inp.geo
    qpk = triton.next_power_of_2(geo.num_heads // geo.num_kv_heads)
    shape = launch_shape(case.max_query_len, num_segments, narrow=narrow_split)
    table = attention_config(
        head_pad(geo.head_size), qpk, case.max_query_len, shape, inp.key_cache.element_size()
    )
    return dataclasses.replace(
        table, block_q=max(block_m // qpk, 1), block_m=block_m, tile_n=tile_n, num_warps=warps,
        num_stages=stages, page_lookahead=uses_page_lookahead(shape, stages),
    )  # fmt: skip


def _override_config_table(spec: str) -> None:
    """--table: replace rows of our config table for this run, e.g. 'prefill_dense=128x128x8x2'
    ('prefill_tma=ROWSxKEYSxWARPSxSTAGES' and 'prefill_tma_min=PROGRAMS' for the TMA prefill;
    'SHAPE_slice=TILES' or 'SHAPE_slice=TILESxWAVES' for the key tiles a split-KV slice of that
    shape prefers, and the waves of programs its slices fill; 'SHAPE_lookahead=1' or 0 for
    whether that shape's paged loop looks its pages up a tile ahead).

    Unlike portable@CONFIG (one config for every launch of the unified kernel), this changes
    what the table hands both routes for one launch shape, so the grouped route can be swept.
    """
    from vllm_portable_attn.kernels import configs

    arch = configs.config_table_name()
    for item in filter(None, spec.split(",")):
        shape, _, tile = item.partition("=")
        row = tuple(int(x) for x in tile.split("x"))
        if shape == "prefill_tma" and arch in configs._TMA_PREFILL:
            configs._TMA_PREFILL[arch] = (row, configs._TMA_PREFILL[arch][1])
        elif shape == "prefill_tma_min" and arch in configs._TMA_PREFILL:
            (min_programs,) = row  # the fewest programs that take the TMA prefill
            configs._TMA_PREFILL[arch] = (configs._TMA_PREFILL[arch][0], min_programs)
        elif shape.endswith("_slice") and shape.removesuffix("_slice") in configs.SHAPES:
            # TILES, or TILESxWAVES: the slice length a split row prefers, and the waves of
            # programs it fills (configs._SPLIT_SLICES).
            key = (arch, shape.removesuffix("_slice"))
            waves = configs._SPLIT_SLICES.get(key, (0, configs.FILL_WAVES))[1]
            configs._SPLIT_SLICES[key] = (row[0], row[1] if len(row) > 1 else waves)
        elif shape.endswith("_lookahead") and shape.removesuffix("_lookahead") in configs.SHAPES:
            # 1 or 0: whether that shape's paged loop looks its pages up a tile ahead.
            (on,) = row
            lookahead = configs._PAGE_LOOKAHEAD_SHAPES
            (lookahead.add if on else lookahead.discard)(shape.removesuffix("_lookahead"))
        elif shape in configs.SHAPES:
            configs._TABLE[(arch, shape)] = row
        else:
            raise SystemExit(f"--table: unknown shape {shape!r}; one of {configs.SHAPES}")
    configs.attention_config.cache_clear()


def _new_tokens_kv(inp: Inputs) -> list[tuple[Any, Any]]:
    """Each copy's new-token K/V, [tokens, kv_heads, D], gathered once from the cache: the
    grouped route's fresh prefills read them, as the backend reads vLLM's key/value."""
    import torch

    q_lens = torch.tensor(inp.case.q_lens, device=inp.device)
    kv_lens = torch.tensor(inp.case.seq_lens, device=inp.device)
    seq = torch.repeat_interleave(torch.arange(len(q_lens), device=inp.device), q_lens)
    first_token = torch.cumsum(q_lens, 0) - q_lens
    pos = (kv_lens - q_lens)[seq] + torch.arange(len(seq), device=inp.device) - first_token[seq]
    block_size = inp.geo.block_size
    new_kv = []
    for table in inp.block_tables[: inp.copies]:
        pages, offs = table[seq, pos // block_size].long(), pos % block_size
        new_kv.append((inp.key_cache[pages, offs], inp.value_cache[pages, offs]))
    return new_kv


def _provider_portable(
    inp: Inputs, args: argparse.Namespace, config: str | None = None
) -> tuple[ProviderFn, dict]:
    from vllm_portable_attn.kernels import unified_attention

    case = inp.case
    segs, ws, narrow = _split_policy(inp, args)
    cfg = _parse_config(config, inp, segs, narrow) if config else None

    def run(i: int, out: Any) -> None:
        unified_attention(
            inp.query[i], inp.key_cache, inp.value_cache, out, inp.query_start_loc,
            inp.seq_lens, inp.block_tables[i], max_query_len=case.max_query_len,
            max_seq_len=case.max_seq_len, softmax_scale=inp.scale, causal=True, num_segments=segs,
            workspace=ws, narrow_split=narrow, config=cfg,
        )  # fmt: skip

    return run, {"num_segments": segs, "config": config or "table"}


def _provider_portable_grouped(
    inp: Inputs, args: argparse.Namespace, tma_prefill: bool = True
) -> tuple[ProviderFn, dict]:
    """The grouped route: classify once (the builder's job, once per step), then the per-group
    kernels (the impl's job, once per layer). Only the per-layer part is timed. `tma_prefill`
    False keeps fresh prefills on the portable dense kernel where the TMA prefill applies."""
    import numpy as np

    from vllm_portable_attn.kernels import (
        MAX_DECODE_QUERY_LEN,
        RequestGroups,
        classify_requests,
        group_sizes,
        grouped_attention,
    )

    case = inp.case
    segs, ws, narrow = _split_policy(inp, args)
    groups = RequestGroups.allocate(case.num_reqs, inp.device)
    classify_requests(inp.query_start_loc, inp.seq_lens, groups, MAX_DECODE_QUERY_LEN)
    new_kv = _new_tokens_kv(inp)
    # The plan's host-side counts (each group launches over its own grid, as in an eager step).
    sizes = group_sizes(np.array(case.q_lens), np.array(case.seq_lens), MAX_DECODE_QUERY_LEN)

    def run(i: int, out: Any) -> None:
        grouped_attention(
            inp.query[i], *new_kv[i], inp.key_cache, inp.value_cache, out,
            inp.query_start_loc, inp.seq_lens, inp.block_tables[i], groups,
            max_query_len=case.max_query_len, max_seq_len=case.max_seq_len, softmax_scale=inp.scale,
            causal=True, num_segments=segs, workspace=ws, narrow_split=narrow, group_sizes=sizes,
            allow_tma_prefill=tma_prefill,
        )  # fmt: skip

    return run, {"num_segments": segs, "tma_prefill": tma_prefill}


def _provider_reference(inp: Inputs, args: argparse.Namespace) -> tuple[ProviderFn, dict]:
    from vllm_portable_attn.reference import paged_attention_reference

    case = inp.case

    def run(i: int, out: Any) -> None:
        paged_attention_reference(
            inp.query[i],
            inp.key_cache,
            inp.value_cache,
            out,
            inp.query_start_loc,
            inp.seq_lens,
            inp.block_tables[i],
            max_query_len=case.max_query_len,
            max_seq_len=case.max_seq_len,
            softmax_scale=inp.scale,
            causal=True,
        )

    return run, {}


def _provider_triton_attn(inp: Inputs, args: argparse.Namespace) -> tuple[ProviderFn, dict]:
    """vLLM's Triton unified kernel, called the way TRITON_ATTN's impl calls it, with the
    builder's preallocated split-KV (3D) scratch so small decode batches take the split path."""
    import torch
    import triton
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention as vllm_ua

    try:
        from vllm.v1.attention.backends import triton_attn as ta

        min_grid = getattr(ta, "MIN_LAUNCH_GRID_SIZE_2D", 128)
        num_par = getattr(ta, "NUM_PAR_SOFTMAX_SEGMENTS", 16)
    except ImportError:
        min_grid, num_par = 128, 16
    case, geo = inp.case, inp.geo
    # The builder's threshold; under full CUDA graphs it snaps to the nearest capture size,
    # which for 8 KV heads (threshold 16) is 16 itself.
    thr = min_grid // geo.num_kv_heads
    dev = inp.device
    d_pad = triton.next_power_of_2(geo.head_size)
    segm_out = torch.empty((thr, geo.num_heads, num_par, d_pad), dtype=torch.float32, device=dev)
    segm_max = torch.empty((thr, geo.num_heads, num_par), dtype=torch.float32, device=dev)
    segm_sum = torch.empty((thr, geo.num_heads, num_par), dtype=torch.float32, device=dev)
    one = torch.ones(1, dtype=torch.float32, device=dev)
    descale_shape = (case.num_reqs, geo.num_kv_heads)
    k_descale = one.expand(descale_shape)
    v_descale = one.expand(descale_shape)

    def run(i: int, out: Any) -> None:
        vllm_ua(
            q=inp.query[i],
            k=inp.key_cache,
            v=inp.value_cache,
            out=out,
            cu_seqlens_q=inp.query_start_loc,
            max_seqlen_q=case.max_query_len,
            seqused_k=inp.seq_lens,
            max_seqlen_k=case.max_seq_len,
            softmax_scale=inp.scale,
            causal=True,
            window_size=(-1, -1),
            block_table=inp.block_tables[i],
            softcap=0,
            q_descale=None,
            k_descale=k_descale,
            v_descale=v_descale,
            seq_threshold_3D=thr,
            num_par_softmax_segments=num_par,
            softmax_segm_output=segm_out,
            softmax_segm_max=segm_max,
            softmax_segm_expsum=segm_sum,
        )

    uses_3d = case.max_query_len == 1 and case.num_reqs <= thr
    return run, {"path": "3d" if uses_3d else "2d"}


def _provider_fa3(inp: Inputs, args: argparse.Namespace) -> tuple[ProviderFn, dict]:
    """FA3 through vLLM's vllm_flash_attn, paged through the block table, with its own split
    heuristics (num_splits=0) as FLASH_ATTN uses outside CUDA graphs."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func, is_fa_version_supported

    if not is_fa_version_supported(3):
        raise RuntimeError("FA3 is not supported on this GPU/build")
    case = inp.case

    def run(i: int, out: Any) -> None:
        flash_attn_varlen_func(
            q=inp.query[i],
            k=inp.key_cache,
            v=inp.value_cache,
            max_seqlen_q=case.max_query_len,
            cu_seqlens_q=inp.query_start_loc,
            max_seqlen_k=case.max_seq_len,
            seqused_k=inp.seq_lens,
            softmax_scale=inp.scale,
            causal=True,
            block_table=inp.block_tables[i],
            out=out,
            fa_version=3,
        )

    return run, {}


def _provider_flashinfer(inp: Inputs, args: argparse.Namespace) -> tuple[ProviderFn, dict]:
    """FlashInfer paged wrappers (optional; JIT-compiles on first use, which can take minutes).
    Planned once per copy outside the timed region; decode-only batches use the decode wrapper
    with tensor cores, anything else the prefill wrapper with a causal mask."""
    import flashinfer
    import torch

    case, geo = inp.case, inp.geo
    dev = inp.device
    decode_only = case.max_query_len == 1
    wrappers = []
    for c in range(inp.copies):
        ws = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
        per_seq = inp.block_lists[c]
        indptr = [0]
        for ids in per_seq:
            indptr.append(indptr[-1] + len(ids))
        kv_indptr = torch.tensor(indptr, dtype=torch.int32, device=dev)
        kv_indices = torch.cat(per_seq).to(device=dev, dtype=torch.int32)
        last = [kv - (math.ceil(kv / geo.block_size) - 1) * geo.block_size for kv in case.seq_lens]
        last_page_len = torch.tensor(last, dtype=torch.int32, device=dev)
        if decode_only:
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
            w.plan(
                kv_indptr,
                kv_indices,
                last_page_len,
                geo.num_heads,
                geo.num_kv_heads,
                geo.head_size,
                geo.block_size,
                q_data_type=geo.dtype,
                kv_data_type=geo.dtype,
                sm_scale=inp.scale,
            )
        else:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
            w.plan(
                inp.query_start_loc,
                kv_indptr,
                kv_indices,
                last_page_len,
                geo.num_heads,
                geo.num_kv_heads,
                geo.head_size,
                geo.block_size,
                causal=True,
                sm_scale=inp.scale,
                q_data_type=geo.dtype,
                kv_data_type=geo.dtype,
            )
        wrappers.append(w)

    def run(i: int, out: Any) -> None:
        wrappers[i].run(inp.query[i], (inp.key_cache, inp.value_cache), out=out)

    return run, {"wrapper": "decode" if decode_only else "prefill"}


PROVIDERS: dict[str, Callable[[Inputs, argparse.Namespace], tuple[ProviderFn, dict]]] = {
    "portable": _provider_portable,
    "portable_grouped": _provider_portable_grouped,
    "portable_grouped_no_tma": functools.partial(_provider_portable_grouped, tma_prefill=False),
    "triton_attn": _provider_triton_attn,
    "fa3": _provider_fa3,
    "flashinfer": _provider_flashinfer,
    "reference": _provider_reference,
}
NEEDS_VLLM = {"triton_attn", "fa3"}

# The PyTorch reference materialises fp32 scores per sequence: [heads, q, kv]. Beyond this many
# elements for one sequence it is too slow / too big to be worth it; FA3 is the yardstick then.
REFERENCE_MAX_ELEMS = 2**28


def reference_feasible(case: Case, geo: Geometry) -> bool:
    return all(
        geo.num_heads * q * kv <= REFERENCE_MAX_ELEMS
        for q, kv in zip(case.q_lens, case.seq_lens, strict=True)
    )


# ============================================================================================
# Ceilings and timing
# ============================================================================================


def _timer(args: argparse.Namespace) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of one call."""
    if args.device == "cpu":
        return _cpu_timer
    import triton.testing as tt

    if args.cudagraph:
        return lambda fn: float(tt.do_bench_cudagraph(fn, rep=args.rep, return_mode="median"))
    return lambda fn: float(tt.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))


def _cpu_timer(fn: Callable[[], Any]) -> float:
    """Wall-clock median of a few calls: only for exercising the harness on a CPU (Triton's
    interpreter); the numbers mean nothing."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _num_sms(device: str) -> int:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return 132  # pretend to be an H100/H200 so the split policy takes its GPU decisions
    return torch.cuda.get_device_properties(0).multi_processor_count


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def measure_ceilings(args: argparse.Namespace) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and 8192^3 bf16 GEMM TFLOP/s,
    measured with the same timer as the kernels."""
    import torch

    timer = _timer(args)
    n = 512 * 1024 * 1024  # bf16 elements: 1 GiB per buffer, far beyond L2
    bufs = [
        torch.randn(n, dtype=torch.bfloat16, device="cuda"),
        torch.empty(n, dtype=torch.bfloat16, device="cuda"),
    ]
    ms = timer(lambda: bufs[1].copy_(bufs[0]))
    copy_tbps = 2 * n * 2 / (ms * 1e-3) / 1e12
    bufs.clear()
    m = 8192
    mats = [torch.randn((m, m), dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    ms_mm = timer(lambda: torch.matmul(mats[0], mats[1], out=mats[2]))
    gemm_tflops = 2 * m**3 / (ms_mm * 1e-3) / 1e12
    mats.clear()
    torch.cuda.empty_cache()
    return {"copy_tbps": copy_tbps, "gemm_tflops": gemm_tflops}


def _copies_for(case: Case, geo: Geometry, rotate_bytes: int) -> int:
    per_copy = _bytes_moved(case, geo)
    return max(1, min(16, math.ceil(rotate_bytes / max(per_copy, 1))))


def _bytes_moved(case: Case, geo: Geometry) -> int:
    """K and V actually read (each sequence's keys once) plus Q read and O written."""
    kv = case.kv_tokens * geo.num_kv_heads * geo.head_size * 2 * geo.elem_bytes
    qo = 2 * case.num_tokens * geo.num_heads * geo.head_size * geo.elem_bytes
    return kv + qo


def _flops(case: Case, geo: Geometry) -> int:
    """Causal attention FLOPs: 2 for QK^T and 2 for PV per head, dim and attended pair."""
    return 4 * geo.num_heads * geo.head_size * case.attended_pairs


def _is_fatal_cuda_error(e: BaseException) -> bool:
    """After an illegal access the CUDA context is unusable: stop instead of cascading."""
    msg = str(e)
    return any(
        s in msg
        for s in (
            "illegal memory access",
            "unspecified launch failure",
            "device-side assert",
            "CUDA error: an illegal",
        )
    )


def run_kernels(args: argparse.Namespace) -> int:
    """The ``kernels`` subcommand."""
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    geo = Geometry(args.num_heads, args.num_kv_heads, args.head_size, args.block_size, dtype)
    cases = select_cases(args.cases, args.max_kv_tokens)
    if args.list_cases:
        rows = [
            (c.id, c.group, c.num_reqs, c.num_tokens, c.max_seq_len, "yes" if c.baseline else "")
            for c in cases
        ]
        print(C.fmt_table(["case", "group", "seqs", "q tokens", "max kv", "baseline"], rows))
        return 0

    if args.device == "cpu":
        # Must precede the first Triton import; kernels then run in Triton's interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.no_ceilings = True
    import torch

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print(
            "kernels: no CUDA device; nothing to time (--list-cases shows the cases; "
            "--device cpu --cases smoke exercises the harness)"
        )
        return 2
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    # "portable@BMxTNxWxS" runs our unified kernel with that tile config (config sweeps).
    for spec in filter(None, args.configs.split(",")):
        PROVIDERS[f"portable@{spec}"] = functools.partial(_provider_portable, config=spec)
        providers.append(f"portable@{spec}")
    for p in providers:
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    if args.table:
        _override_config_table(args.table)

    info = C.run_info()
    print(
        f"GPU {info['gpu']} ({info['num_sms']} SMs); torch {info['torch']}, triton "
        f"{info['triton']}, vllm {info['vllm']}; commit {info['git_commit']}",
        flush=True,
    )
    timer = _timer(args)
    rows_out: list[dict[str, Any]] = []

    ceil: dict[str, float] = {}
    if not args.no_ceilings and not args.check_only:
        ceil = measure_ceilings(args)
        print(
            f"measured ceilings: copy {ceil['copy_tbps']:.2f} TB/s (read+write), "
            f"bf16 GEMM 8192^3 {ceil['gemm_tflops']:.0f} TFLOP/s",
            flush=True,
        )
        ceil_row = C.stamp({"kind": "ceiling", **ceil, "timer": _timer_name(args)})
        rows_out.append(ceil_row)
        C.append_jsonl(args.out, [ceil_row])

    l2 = 50 * 2**20
    if dev == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", l2) or l2
    rotate_bytes = int(args.rotate_l2 * l2)

    # Resolve providers once: a missing vLLM or kernel package is one message, not one per case.
    available: dict[str, str | None] = {}
    for p in providers:
        try:
            if p in NEEDS_VLLM:
                import vllm  # noqa: F401
            if p == "flashinfer":
                import flashinfer  # noqa: F401
            if p.startswith("portable") or p == "reference":
                import vllm_portable_attn.kernels  # noqa: F401
            available[p] = None
        except Exception as e:  # noqa: BLE001 - report and skip the provider
            available[p] = f"{type(e).__name__}: {e}"
            print(f"provider {p}: unavailable ({available[p]})", flush=True)

    fatal: str | None = None
    t_start = time.monotonic()
    stopped_early = 0
    for n_done, case in enumerate(cases):
        if fatal:
            break
        if args.max_seconds and time.monotonic() - t_start > args.max_seconds:
            stopped_early = len(cases) - n_done
            print(f"--max-seconds reached: {stopped_early} cases not run", flush=True)
            break
        copies = 1 if args.check_only else _copies_for(case, geo, rotate_bytes)
        try:
            inp = Inputs(case, geo, copies, args.seed, dev, args.page_order == "shuffled")
        except torch.OutOfMemoryError as e:
            print(f"{case.id}: skipped, inputs do not fit ({e})", flush=True)
            continue
        nbytes, flops = _bytes_moved(case, geo), _flops(case, geo)
        base = {
            "kind": "kernel",
            "case": case.id,
            "group": case.group,
            "baseline": case.baseline,
            "num_seqs": case.num_reqs,
            "num_tokens": case.num_tokens,
            "max_q": case.max_query_len,
            "max_kv": case.max_seq_len,
            "kv_tokens": case.kv_tokens,
            "bytes": nbytes,
            "flops": flops,
            "num_heads": geo.num_heads,
            "num_kv_heads": geo.num_kv_heads,
            "head_size": geo.head_size,
            "block_size": geo.block_size,
            "dtype": geo.dtype_name,
            "copies": copies,
            "timer": _timer_name(args),
            "table_override": args.table or None,
            "page_order": args.page_order,
        }
        outputs: dict[str, Any] = {}
        case_rows: dict[str, dict[str, Any]] = {}
        fns: dict[str, ProviderFn] = {}
        # Reference output first (not timed) where the PyTorch loop is affordable.
        ref_name: str | None = None
        ref_out = None
        if not args.no_reference:
            if reference_feasible(case, geo):
                try:
                    fn, _ = _provider_reference(inp, args)
                    ref_out = inp.new_outputs()[0]
                    fn(0, ref_out)
                    _sync(dev)
                    ref_name = "reference"
                except Exception as e:  # noqa: BLE001
                    print(f"{case.id}: reference failed: {e}", flush=True)
        for p in providers:
            row = dict(base, provider=p)
            case_rows[p] = row
            if available[p] is not None:
                row["error"] = f"unavailable: {available[p]}"
                continue
            if p == "reference" and not reference_feasible(case, geo):
                row["error"] = "skipped: reference too large for this case"
                continue
            try:
                fn, extra = PROVIDERS[p](inp, args)
                row.update(extra)
                out = inp.new_outputs()
                fn(0, out[0])
                _sync(dev)
                outputs[p] = out[0]
                fns[p] = fn
                row["_outs"] = out
            except Exception as e:  # noqa: BLE001 - one provider failing must not stop the run
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                if args.verbose:
                    traceback.print_exc()
                if _is_fatal_cuda_error(e):
                    fatal = f"{p} on {case.id}: {row['error']}"
        if ref_out is None and "fa3" in outputs:
            ref_name, ref_out = "fa3", outputs["fa3"]
        # Correctness before timing.
        for p, out0 in outputs.items():
            row = case_rows[p]
            yard_name, yard = ref_name, ref_out
            if p == yard_name:  # FA3 is the yardstick: check it against our kernel instead
                yard_name, yard = (
                    ("portable", outputs.get("portable")) if p != "portable" else (None, None)
                )
            if yard is None:
                row["check"] = "unchecked"
                continue
            diff = (out0.float() - yard.float()).abs()
            finite = bool(torch.isfinite(out0).all())
            max_err = float(diff.max()) if diff.numel() else 0.0
            ok = finite and bool((diff <= args.atol + args.atol * yard.float().abs()).all())
            row.update(check_vs=yard_name, max_abs_err=max_err, check="ok" if ok else "FAIL")
        if fatal:
            print(f"FATAL CUDA error, stopping: {fatal}", flush=True)
        # Timing.
        if not args.check_only and not fatal:
            for p, fn in fns.items():
                row = case_rows[p]
                outs = row["_outs"]
                counter = [0]

                def call(
                    fn: ProviderFn = fn,
                    outs: list[Any] = outs,
                    counter: list[int] = counter,
                    copies: int = copies,
                ) -> None:
                    i = counter[0] % copies
                    counter[0] += 1
                    fn(i, outs[i])

                try:
                    ms = timer(call)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"timing: {type(e).__name__}: {str(e)[:300]}"
                    if _is_fatal_cuda_error(e):
                        fatal = f"{p} on {case.id}: {row['error']}"
                        break
                    continue
                t = ms * 1e-3
                row.update(us=ms * 1e3, tbps=nbytes / t / 1e12, tflops=flops / t / 1e12)
                if ceil:
                    t_min = max(
                        nbytes / (ceil["copy_tbps"] * 1e12), flops / (ceil["gemm_tflops"] * 1e12)
                    )
                    row.update(
                        frac_bw=row["tbps"] / ceil["copy_tbps"],
                        frac_flops=row["tflops"] / ceil["gemm_tflops"],
                        frac_roofline=t_min / t,
                    )
            fa3_us = case_rows.get("fa3", {}).get("us")
            for row in case_rows.values():
                if fa3_us and row.get("us"):
                    row["time_vs_fa3"] = row["us"] / fa3_us
                    row["speed_vs_fa3"] = fa3_us / row["us"]
        for row in case_rows.values():
            row.pop("_outs", None)
            full = C.stamp(row)
            rows_out.append(full)
            C.append_jsonl(args.out, [full])
            _print_kernel_row(full)
        del inp, outputs, fns, case_rows, ref_out
        if dev == "cuda":
            torch.cuda.empty_cache()

    print()
    print(kernel_table(rows_out))
    summary = kernel_summary(rows_out, fatal)
    if stopped_early:
        summary += f"; {stopped_early} cases not run (--max-seconds)"
    print(summary)
    bad = [r for r in rows_out if r.get("check") == "FAIL"]
    return 1 if (bad or fatal) else 0


def _timer_name(args: argparse.Namespace) -> str:
    if args.device == "cpu":
        return "cpu wall clock (Triton interpreter; meaningless)"
    if args.cudagraph:
        return f"do_bench_cudagraph(rep={args.rep}) median"
    return f"do_bench(warmup={args.warmup}, rep={args.rep}) median"


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _print_kernel_row(r: dict[str, Any]) -> None:
    msg = (
        f"{r['case']:<26} {r['provider']:<12} "
        + (
            f"{r['us']:9.1f} us {r['tbps']:5.2f} TB/s {r['tflops']:6.1f} TFLOP/s"
            if r.get("us")
            else " " * 41
        )
        + (
            f"  {r['check']}"
            + (f" (err {r['max_abs_err']:.2e} vs {r['check_vs']})" if "max_abs_err" in r else "")
            if r.get("check")
            else ""
        )
        + (f"  segs={r['num_segments']}" if "num_segments" in r else "")
        + (f"  ERROR {r['error']}" if r.get("error") else "")
    )
    print(msg, flush=True)


def kernel_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        if r.get("kind") != "kernel":
            continue
        body.append(
            (
                r["case"],
                r["provider"],
                _f(r.get("us"), ".1f"),
                _f(r.get("tbps"), ".2f"),
                _f(r.get("tflops"), ".1f"),
                _f(100 * r["frac_roofline"], ".0f") if "frac_roofline" in r else "",
                _f(r.get("speed_vs_fa3"), ".2f"),
                r.get("check", ""),
                _f(r.get("max_abs_err"), ".1e"),
                ("ERR " + r["error"][:40]) if r.get("error") else "",
            )
        )
    return C.fmt_table(
        [
            "case",
            "provider",
            "us",
            "TB/s",
            "TFLOP/s",
            "%roof",
            "xFA3 speed",
            "check",
            "max err",
            "note",
        ],
        body,
    )


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def kernel_summary(rows: list[dict[str, Any]], fatal: str | None) -> str:
    kr = [r for r in rows if r.get("kind") == "kernel"]
    checks = [r for r in kr if r.get("check") in ("ok", "FAIL")]
    n_ok = sum(r["check"] == "ok" for r in checks)
    parts = [f"checks {n_ok}/{len(checks)} ok"]
    ours = [r for r in kr if r["provider"] == "portable" and r.get("speed_vs_fa3")]
    if ours:
        worst = min(ours, key=lambda r: r["speed_vs_fa3"])
        gm = _geomean([r["speed_vs_fa3"] for r in ours])
        parts.append(
            f"portable speed vs FA3 geomean {gm:.2f} over {len(ours)} cases, "
            f"worst {worst['speed_vs_fa3']:.2f} ({worst['case']})"
        )
        for g in GROUPS:
            gs = [r["speed_vs_fa3"] for r in ours if r["group"] == g]
            if gs:
                parts.append(f"{g} {_geomean(gs):.2f}")
    else:
        timed = [r for r in kr if r["provider"] == "portable" and r.get("frac_roofline")]
        if timed:
            parts.append(
                f"portable timed on {len(timed)} cases (no FA3 in this run), roofline "
                f"fraction geomean {_geomean([r['frac_roofline'] for r in timed]):.2f}"
            )
    vt = [r for r in kr if r["provider"] == "triton_attn" and r.get("speed_vs_fa3")]
    if vt:
        parts.append(f"triton_attn vs FA3 geomean {_geomean([r['speed_vs_fa3'] for r in vt]):.2f}")
    errs = [
        r for r in kr if r.get("error") and not r["error"].startswith(("unavailable", "skipped"))
    ]
    if errs:
        parts.append(f"{len(errs)} provider errors")
    if fatal:
        parts.append(f"FATAL: {fatal[:120]}")
    return "SUMMARY: kernels: " + "; ".join(parts)


# ============================================================================================
# End to end
# ============================================================================================


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    input_len: int | tuple[int, int]  # fixed, or (min, max) uniform
    output_len: int | tuple[int, int]


WORKLOADS: dict[str, Workload] = {
    "short": Workload("short", 256, 1024, 256),
    "long": Workload("long", 64, 8192, 512),
    "mixed": Workload("mixed", 128, (128, 8192), (32, 512)),
    # Latency, as `vllm bench latency` measures it: one small batch, start to last token.
    "latency": Workload("latency", 8, 1024, 128),
}
QUICK_WORKLOADS: dict[str, Workload] = {
    "short": Workload("short", 64, 1024, 64),
    "long": Workload("long", 16, 8192, 64),
    "mixed": Workload("mixed", 32, (128, 8192), (16, 128)),
    "latency": Workload("latency", 8, 1024, 32),
}
# A latency batch takes a second or two, so it is timed this many times; rows give the median.
LATENCY_REPEATS = 5


def _draw(spec: int | tuple[int, int], rng: random.Random) -> int:
    return spec if isinstance(spec, int) else rng.randint(spec[0], spec[1])


def make_requests(w: Workload, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """Deterministic random token-id prompts: identical for every backend."""
    rng = random.Random(f"{w.name}-{seed}")
    reqs = []
    for _ in range(w.num_prompts):
        n_in, n_out = _draw(w.input_len, rng), _draw(w.output_len, rng)
        # Stay clear of special ids at both ends of the vocabulary.
        reqs.append(([rng.randint(100, vocab - 100) for _ in range(n_in)], n_out))
    return reqs


def _max_len(ws: Sequence[Workload]) -> int:
    def hi(x: int | tuple[int, int]) -> int:
        return x if isinstance(x, int) else x[1]

    need = max(hi(w.input_len) + hi(w.output_len) for w in ws)
    return max(2048, math.ceil(need / 256) * 256)


def e2e_worker(args: argparse.Namespace) -> int:
    """Child process: one engine, one backend, the selected workloads; results to a JSON file
    after every workload, so a later time-out keeps what finished."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    table = QUICK_WORKLOADS if args.quick else WORKLOADS
    workloads = [table[n] for n in args.workloads.split(",")]
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    result: dict[str, Any] = {"backend": args.backend, "workloads": {}, "ok": False}
    out_path = Path(args.json_result)

    def save() -> None:
        out_path.write_text(json.dumps(result))

    llm, engine_info = C.start_dummy_engine(args)
    result.update(engine_info)
    print(
        f"[e2e {args.backend}] engine up in {result['engine_start_s']:.1f}s; "
        f"attention impls {result['impls']}",
        flush=True,
    )
    save()
    if args.warmup:
        # A few short requests first, so lazy work (Triton JIT of shapes the capture did not
        # see, allocator growth) lands outside the timed region; same for every backend.
        rng = random.Random(12345)
        warm = [
            TokensPrompt(prompt_token_ids=[rng.randint(100, vocab - 100) for _ in range(n)])
            for n in (17, 300, 1500, 2100)
            if n + 16 <= args.max_model_len
        ]
        llm.generate(
            warm, SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False
        )
    for w in workloads:
        if args.warmup:
            # The workload's prompts once more, untimed, with other token ids (so the prefix
            # cache cannot serve the timed ones) and 16 output tokens: every step shape the timed
            # run has (decodes beside prefill chunks and their continuations, or enough
            # fresh-prefill tokens for CUSTOM's TMA prefill) is seen first, so no kernel compiles
            # inside the timed region (a copy with 1/8 of the prompts may not reach them all).
            warm_reqs = make_requests(replace(w, output_len=16), vocab, args.seed + 1)
            llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids, _ in warm_reqs],
                SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False),
                use_tqdm=False,
            )
        reqs = make_requests(w, vocab, args.seed)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in reqs]
        # Default sampling (temperature 1), as `vllm bench throughput` uses.
        sps = [SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False) for _, n in reqs]
        walls = []
        for _ in range(LATENCY_REPEATS if w.name == "latency" else 1):
            t1 = time.perf_counter()
            outs = llm.generate(prompts, sps, use_tqdm=False)
            walls.append(time.perf_counter() - t1)
        wall = statistics.median(walls)
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        n_in = sum(len(ids) for ids, _ in reqs)
        expected = sum(n for _, n in reqs)
        result["workloads"][w.name] = {
            "num_prompts": w.num_prompts,
            "input_len": w.input_len,
            "output_len": w.output_len,
            "prompt_tokens": n_in,
            "output_tokens": n_out,
            "expected_output_tokens": expected,
            "wall_s": wall,
            "wall_runs_s": walls,
            # Per output step of the batch (the first includes the prefill).
            "ms_per_step": 1000 * wall / w.output_len if isinstance(w.output_len, int) else None,
            "out_tok_s": n_out / wall,
            "total_tok_s": (n_in + n_out) / wall,
            "req_s": len(outs) / wall,
            "complete": n_out == expected,
        }
        print(
            f"[e2e {args.backend}] {w.name}: {n_out} out tokens in {wall:.2f}s = "
            f"{n_out / wall:.0f} out tok/s",
            flush=True,
        )
        save()
    result["ok"] = True
    save()
    return 0


def run_e2e(args: argparse.Namespace) -> int:
    """The ``e2e`` subcommand: one child per backend, then a comparison table."""
    table = QUICK_WORKLOADS if args.quick else WORKLOADS
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    for n in names:
        if n not in table:
            raise SystemExit(f"unknown workload {n!r}; choose from {', '.join(table)}")
    backends = [b.strip().upper() for b in args.backends.split(",") if b.strip()]
    max_len = args.max_model_len or _max_len([table[n] for n in names])
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    t_start = time.monotonic()
    for k, be in enumerate(backends):
        left = args.total_timeout - (time.monotonic() - t_start) if args.total_timeout else 1e9
        # Leave each later backend its minimum, so one slow engine cannot starve the rest.
        share = min(
            left, max(left - (len(backends) - k - 1) * args.min_backend_s, args.min_backend_s)
        )
        if left < args.min_backend_s:
            print(f"=== e2e {be}: skipped, {left:.0f}s left of --total-timeout", flush=True)
            for n in names:
                rows.append(
                    {
                        "kind": "e2e",
                        "backend": be,
                        "workload": n,
                        "quick": args.quick,
                        "ok": False,
                        "error": "skipped: out of time",
                    }
                )
            continue
        res_file = tmp / f"{be}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "_e2e_worker",
            "--backend",
            be,
            "--model",
            str(args.model),
            "--workloads",
            ",".join(names),
            "--max-model-len",
            str(max_len),
            "--gpu-mem",
            str(args.gpu_mem),
            "--seed",
            str(args.seed),
            "--json-result",
            str(res_file),
        ]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--enforce-eager"] if args.enforce_eager else []
        cmd += [] if args.warmup else ["--no-warmup"]
        print(
            f"=== e2e {be}: {' '.join(names)}{' (quick)' if args.quick else ''}, "
            f"max_model_len {max_len}",
            flush=True,
        )
        child = C.run_child(
            cmd,
            env_update=C.child_env(be, args.route),
            timeout_s=min(args.timeout_per_backend, share),
            prefix=f"[{be}] ",
        )
        try:
            res = json.loads(res_file.read_text())
        except (OSError, json.JSONDecodeError):
            res = {"workloads": {}, "ok": False}
        for n in names:
            wres = res["workloads"].get(n)
            row: dict[str, Any] = {
                "kind": "e2e",
                "backend": be,
                "workload": n,
                "quick": args.quick,
                "model": Path(args.model).name,
                "max_model_len": max_len,
                "route": args.route if be == "CUSTOM" else None,
                "enforce_eager": args.enforce_eager,
                "backends_logged": child.backends_logged,
                "impls": res.get("impls"),
                "engine_start_s": res.get("engine_start_s"),
                # K7: what vLLM's JIT monitor reported for this engine (warm-ups included).
                "compiled_while_serving": child.compiled_while_serving,
                "rc": child.rc,
                "timed_out": child.timed_out,
            }
            if wres:
                row.update(wres)
                row["ok"] = bool(wres.get("complete"))
            else:
                row["ok"] = False
                row["error"] = (
                    ("timed out" if child.timed_out else f"rc={child.rc}")
                    + " before this workload finished; last output: "
                    + " | ".join(child.tail[-5:])
                )
            if be not in child.backends_logged:
                row["backend_warning"] = f"log did not show 'Using {be} backend'"
            rows.append(row)
    by = {(r["backend"], r["workload"]): r for r in rows}
    for r in rows:
        for ref, key in (("FLASH_ATTN", "vs_fa3"), ("TRITON_ATTN", "vs_triton")):
            other = by.get((ref, r["workload"]))
            if other and other.get("out_tok_s") and r.get("out_tok_s"):
                r[key] = r["out_tok_s"] / other["out_tok_s"]
    stamped = [C.stamp(r, init_cuda=False) for r in rows]
    C.append_jsonl(args.out, stamped)
    print()
    print(
        C.fmt_table(
            "workload backend out_tok/s xFA3 xTRITON wall_s ms/step start_s jit status".split(),
            [
                (
                    r["workload"],
                    r["backend"],
                    _f(r.get("out_tok_s"), ".0f"),
                    _f(r.get("vs_fa3"), ".3f"),
                    _f(r.get("vs_triton"), ".3f"),
                    _f(r.get("wall_s"), ".2f"),
                    _f(r.get("ms_per_step"), ".2f"),
                    _f(r.get("engine_start_s"), ".0f"),
                    ",".join(r.get("compiled_while_serving", [])) or "-",
                    "ok" if r["ok"] else ("FAIL " + r.get("error", "incomplete"))[:60],
                )
                for r in rows
            ],
        )
    )
    parts = []
    for r in rows:
        if r["backend"] == "CUSTOM":
            parts.append(
                f"{r['workload']} CUSTOM {_f(r.get('out_tok_s'), '.0f') or 'FAIL'} tok/s"
                + (f" ({r['vs_fa3']:.2f}x FA3)" if r.get("vs_fa3") else "")
                + "".join(
                    f", compiled while serving: {name}"
                    for name in r.get("compiled_while_serving", [])
                )
            )
    n_ok = sum(r["ok"] for r in rows)
    print(
        f"SUMMARY: e2e{' quick' if args.quick else ''}: {n_ok}/{len(rows)} runs ok; "
        + ("; ".join(parts) if parts else "no CUSTOM rows")
    )
    return 0 if n_ok == len(rows) else 1


# ============================================================================================
# CLI
# ============================================================================================


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{kernels,e2e,plan,precompile}")

    kp = sub.add_parser("kernels", help="kernel-level timings vs FA3 and vLLM's Triton kernel")
    kp.add_argument(
        "--providers",
        default="portable,triton_attn,fa3",
        help="comma list of: " + ", ".join(PROVIDERS) + " (flashinfer JIT-compiles "
        "on first use; reference is the slow PyTorch loop, small cases only; "
        "portable_grouped_no_tma keeps fresh prefills off the sm_90 TMA prefill)",
    )
    kp.add_argument(
        "--cases",
        default="baseline",
        help="comma list of 'baseline' (the performance.md table), 'all', 'smoke' (tiny "
        "uneven batches), a group (" + ", ".join(GROUPS) + ") or case ids (see --list-cases)",
    )
    kp.add_argument("--list-cases", action="store_true", help="print the selected cases; exit")
    kp.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    kp.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    kp.add_argument(
        "--cudagraph",
        action="store_true",
        help="time with triton's do_bench_cudagraph (no launch overhead, no L2 "
        "flush; inputs rotate across copies instead)",
    )
    kp.add_argument("--check-only", action="store_true", help="correctness checks, no timing")
    kp.add_argument("--no-ceilings", action="store_true", help="skip copy/GEMM ceilings")
    kp.add_argument(
        "--no-reference",
        action="store_true",
        help="do not check against the PyTorch reference (FA3 is used if present)",
    )
    kp.add_argument(
        "--configs",
        default="",
        help="comma list of BMxTNxWxS tile configs (rows, keys per tile, warps, stages) to "
        "time our unified kernel with, each as provider portable@CONFIG",
    )
    kp.add_argument(
        "--page-order",
        default="shuffled",
        choices=["shuffled", "contiguous"],
        help="block ids of each sequence: shuffled over the cache (default, like a long-running "
        "server) or consecutive",
    )
    kp.add_argument(
        "--table",
        default="",
        help="comma list of SHAPE=BMxTNxWxS replacing rows of our config table for this run "
        "(shapes: those of configs.SHAPES, and prefill_tma: the TMA prefill's tile, its "
        "minimum unchanged); prefill_tma_min=N sets that minimum (query blocks x heads); "
        "SHAPE_slice=N or NxW (a split shape, e.g. decode_split_slice=8x4) the key tiles its "
        "slices prefer and the waves of programs they fill; SHAPE_lookahead=1 or 0 whether its "
        "paged loop looks its pages up a tile ahead",
    )
    kp.add_argument(
        "--segments",
        type=int,
        default=0,
        help="force our split-KV segment count (power of two); 0 = our policy",
    )
    kp.add_argument(
        "--atol",
        type=float,
        default=2e-2,
        help="absolute and relative tolerance of the output check (bf16)",
    )
    kp.add_argument(
        "--rotate-l2",
        type=float,
        default=2.0,
        help="rotate input copies totalling this many times the L2 size (max 16)",
    )
    kp.add_argument(
        "--max-kv-tokens",
        type=int,
        default=4 * 1024 * 1024,
        help="drop sweep cases whose KV cache holds more tokens than this",
    )
    kp.add_argument("--num-heads", type=int, default=32)
    kp.add_argument("--num-kv-heads", type=int, default=8)
    kp.add_argument("--head-size", type=int, default=128)
    kp.add_argument("--block-size", type=int, default=16)
    kp.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 on cuda; float32 on cpu (Triton's interpreter has no bf16 math)",
    )
    kp.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="start no new case after this many seconds (0: no limit); rows so far are kept",
    )
    kp.add_argument("--seed", type=int, default=0)
    kp.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu runs our kernels in Triton's interpreter to test the harness "
        "(use --cases smoke; timings are meaningless)",
    )
    kp.add_argument("--out", help="append JSON rows to this file")
    kp.add_argument("-v", "--verbose", action="store_true", help="print tracebacks")

    ep = sub.add_parser("e2e", help="vLLM LLM.generate throughput per attention backend")
    ep.add_argument(
        "--backends",
        default="CUSTOM,FLASH_ATTN,TRITON_ATTN",
        help="comma list of vLLM backend names (FLASHINFER optional)",
    )
    ep.add_argument(
        "--workloads",
        default="short,long",
        help="comma list of: "
        + ", ".join(
            f"{w.name} ({w.num_prompts}x{w.input_len}/{w.output_len})" for w in WORKLOADS.values()
        ),
    )
    ep.add_argument(
        "--quick",
        action="store_true",
        help="smaller workloads for a smoke run: "
        + ", ".join(
            f"{w.name} ({w.num_prompts}x{w.input_len}/{w.output_len})"
            for w in QUICK_WORKLOADS.values()
        ),
    )
    ep.add_argument(
        "--model",
        default=str(C.LLAMA_8B_DIR),
        help="folder with a config.json (dummy weights are used)",
    )
    ep.add_argument("--max-model-len", type=int, default=0, help="0: fit the workloads")
    ep.add_argument("--gpu-mem", type=float, default=0.9, help="gpu_memory_utilization")
    ep.add_argument(
        "--route",
        choices=["unified", "grouped"],
        default=None,
        help="PORTABLE_ATTN_ROUTE for the CUSTOM run",
    )
    ep.add_argument(
        "--enforce-eager",
        action="store_true",
        help="disable torch.compile and CUDA graphs (debugging only)",
    )
    ep.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed warm-ups (a short generate, then each workload's prompts)",
    )
    ep.add_argument(
        "--timeout-per-backend",
        type=float,
        default=540,
        help="seconds before a backend's engine process is killed",
    )
    ep.add_argument(
        "--total-timeout",
        type=float,
        default=0,
        help="seconds for all backends together (0: no limit); a backend that "
        "would start with less than --min-backend-s left is skipped",
    )
    ep.add_argument("--min-backend-s", type=float, default=90)
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("--out", help="append JSON rows to this file")

    import plan_overhead  # the 'plan' subcommand (K7 per-step overhead) lives in its own module

    plan_overhead.add_parser(sub)
    import precompile_time  # the 'precompile' subcommand (engine-start compile time)

    precompile_time.add_parser(sub)

    wp = sub.add_parser("_e2e_worker")  # internal: one engine per child process
    wp.add_argument("--backend", required=True)
    wp.add_argument("--model", required=True)
    wp.add_argument("--workloads", required=True)
    wp.add_argument("--max-model-len", type=int, required=True)
    wp.add_argument("--gpu-mem", type=float, default=0.9)
    wp.add_argument("--seed", type=int, default=0)
    wp.add_argument("--json-result", required=True)
    wp.add_argument("--quick", action="store_true")
    wp.add_argument("--enforce-eager", action="store_true")
    wp.add_argument("--no-warmup", dest="warmup", action="store_false")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "kernels":
        return run_kernels(args)
    if args.cmd == "e2e":
        return run_e2e(args)
    if args.cmd == "_e2e_worker":
        return e2e_worker(args)
    if args.cmd == "plan":
        import plan_overhead

        return plan_overhead.run(args)
    if args.cmd == "precompile":
        import precompile_time

        return precompile_time.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
