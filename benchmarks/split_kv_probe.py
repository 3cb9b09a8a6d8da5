#!/usr/bin/env python3
"""Where the time of a split-KV decode goes: ``python3 benchmarks/split_kv_probe.py``.

For small decode batches (Llama-3.1-8B heads: 32 query / 8 KV, d128, bf16, pages of 16) this
times our unified route at several segment counts (the split policy's own and a few fixed
ones), and for each split also the attention launch alone and the merge alone. ``--min-tiles``
overrides `configs.MIN_SEGMENT_TILES` (the fewest key tiles per segment) for a sweep.

Each measurement runs several copies back to back, each with its own pages (as a model's
layers have their own caches), inside one CUDA graph (`triton.testing.do_bench_cudagraph`), so
the K/V bytes come from HBM as in serving; times are per copy. Rows (stamped like bench.py's)
go to ``--out``; a table goes to stdout. CUDA only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (needs the line above; also puts the repo root on sys.path)
import bench  # noqa: E402  (its Case, Geometry and Inputs build the paged batches)

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, PAGE_SIZE = 32, 8, 128, 16
# (batch, context): the decode shapes of goal K2 and the small batches of short contexts that
# an interactive (latency) workload runs.
DEFAULT_CASES = "1x32768,4x32768,8x16384,1x1024,8x1024,8x1152,8x2048,16x1024,32x1024,4x4096"
# Bytes of K/V the copies of one case hold together: several times the H200's 50 MB L2.
COPIES_BYTES = 512 << 20
MAX_COPIES = 16


def probe_case(
    batch: int, context: int, min_tiles: list[int], rep_ms: int, device: str = "cuda"
) -> list[dict]:
    """Rows for one (batch, context): every (min tiles, segment count) pair worth timing."""
    import torch
    from triton.testing import do_bench_cudagraph

    from vllm_portable_attn.kernels import (
        SplitKVWorkspace,
        choose_split,
        merge_segments,
        unified_attention,
    )
    from vllm_portable_attn.kernels import _attention_kernel as kernel_module
    from vllm_portable_attn.kernels.configs import attention_config, launch_shape

    case = bench.Case(f"decode_b{batch}_ctx{context}", "decode", (1,) * batch, (context,) * batch)
    geo = bench.Geometry(NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, PAGE_SIZE, "bfloat16")
    kv_bytes = batch * context * NUM_KV_HEADS * HEAD_SIZE * 2 * geo.elem_bytes
    # One copy per "layer", each with its own pages of one cache.
    inp = bench.Inputs(case, geo, max(1, min(MAX_COPIES, COPIES_BYTES // kv_bytes)), 0, device)
    layers = [
        (inp.query[i], inp.key_cache, inp.value_cache, inp.block_tables[i])
        for i in range(inp.copies)
    ]
    outputs = inp.new_outputs()
    query_start_loc, seq_lens = inp.query_start_loc, inp.seq_lens
    workspace = SplitKVWorkspace.allocate(64, NUM_HEADS, HEAD_SIZE, 32, device)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    policy, narrow = choose_split(batch, batch, 1, NUM_KV_HEADS, num_sms)
    scale = HEAD_SIZE**-0.5

    def attention(segments: int, merge: bool) -> Callable[[], None]:
        config = attention_config(HEAD_SIZE, 4, 1, launch_shape(1, segments, narrow=narrow))
        split = dict(num_segments=segments, workspace=workspace if segments > 1 else None)

        def run() -> None:
            for (query, key, value, table), out in zip(layers, outputs, strict=True):
                if merge:
                    unified_attention(
                        query, key, value, out, query_start_loc, seq_lens, table,
                        max_query_len=1, max_seq_len=context, softmax_scale=scale,
                        narrow_split=narrow, **split,
                    )  # fmt: skip
                else:
                    kernel_module.launch_attention(
                        query, key, value, out, query_start_loc, seq_lens, table,
                        config=config, softmax_scale=scale, causal=True, sliding_window=None,
                        softcap=None, alibi_slopes=None, sinks=None, k_scale=None,
                        v_scale=None, **split,
                    )  # fmt: skip

        return run

    def merge_only(segments: int) -> Callable[[], None]:
        def run() -> None:
            for out in outputs:
                merge_segments(out, workspace, query_start_loc, segments)

        return run

    def per_copy_us(fn: Callable[[], None]) -> float:
        return do_bench_cudagraph(fn, rep=rep_ms) * 1e3 / len(layers)

    segment_counts = sorted({1, policy} | ({4, 8} if context <= 2048 else set()))
    rows = []
    default_min = kernel_module.MIN_SEGMENT_TILES
    try:
        for tiles in min_tiles:
            kernel_module.MIN_SEGMENT_TILES = tiles
            for segments in segment_counts:
                if segments == 1 and tiles != min_tiles[0]:
                    continue  # unsplit: the minimum does not apply
                row = dict(
                    batch=batch, context=context, segments=segments, policy=segments == policy,
                    min_segment_tiles=tiles, copies=len(layers),
                    total_us=per_copy_us(attention(segments, merge=True)),
                )  # fmt: skip
                if segments > 1:
                    row["attention_us"] = per_copy_us(attention(segments, merge=False))
                    row["merge_us"] = per_copy_us(merge_only(segments))
                row["tbps"] = kv_bytes / row["total_us"] / 1e6
                rows.append(row)
    finally:
        kernel_module.MIN_SEGMENT_TILES = default_min
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="BATCHxCONTEXT,...")
    p.add_argument("--min-tiles", default="", help="MIN_SEGMENT_TILES values to sweep, e.g. 1,2,4")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench_cudagraph's rep")
    p.add_argument("--out", help="append JSON rows here")
    args = p.parse_args(argv)

    import torch

    from vllm_portable_attn.kernels.configs import MIN_SEGMENT_TILES

    if not torch.cuda.is_available():
        print("split_kv_probe needs a CUDA GPU", file=sys.stderr)
        return 77
    min_tiles = [int(x) for x in args.min_tiles.split(",") if x] or [MIN_SEGMENT_TILES]
    rows = []
    for case in args.cases.split(","):
        batch, context = (int(x) for x in case.split("x"))
        for row in probe_case(batch, context, min_tiles, args.rep_ms):
            rows.append(C.stamp({"kind": "split_kv_probe", **row}))
            C.append_jsonl(args.out, rows[-1:])
    headers = ["min tiles", "batch", "context", "segments", "total us", "attention", "merge"]
    table = [
        [
            r["min_segment_tiles"], r["batch"], r["context"],
            f"{r['segments']}{'*' if r['policy'] else ''}", f"{r['total_us']:.1f}",
            f"{r.get('attention_us', 0):.1f}", f"{r.get('merge_us', 0):.1f}",
        ]
        for r in rows
    ]  # fmt: skip
    print(C.fmt_table(headers, table))
    print("* = the split policy's segment count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
