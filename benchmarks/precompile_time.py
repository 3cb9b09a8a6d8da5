#!/usr/bin/env python3
"""Engine-start cost of the precompile: ``python3 benchmarks/bench.py precompile``.

Each layer's first eager step compiles every launch its later steps can take before serving
starts (vllm_portable_attn/precompile.py), which vLLM users wait for once per engine start
with a cold Triton cache. This times it for one Llama-3.1-8B attention layer
(benchmarks/_vllm_steps.py: vLLM's real config and metadata objects, our impl and builder) on
each route, once per thread count in ``--threads``: a fresh Triton cache directory and emptied
in-memory caches each time, then vLLM's warm-up step (a 2-token prompt beside a decode)
through the layer's forward, which runs the precompile exactly as in an engine.

Every run of a route must compile the same number of specialisations (a thread pool that
lost one would show here); exit status 1 otherwise, or if a run failed. Rows go to ``--out``
(JSON lines, stamped like bench.py's); a table and one ``SUMMARY:`` line go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (needs the line above; also puts the repo root on sys.path)

from vllm_portable_attn import envs  # noqa: E402  (cheap: no vLLM, torch or Triton)

ROUTES: tuple[str, ...] = get_args(envs.Route)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the ``precompile`` subcommand (and of this file run on its own)."""
    p.add_argument("--routes", default=",".join(ROUTES), help="comma list of kernel routes")
    p.add_argument(
        "--threads",
        help="comma list of compile thread counts (default: 1 and the backend's own count)",
    )
    p.add_argument("--out", help="append JSON rows to this file")
    return p


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``precompile`` subcommand on bench.py's subparsers."""
    return add_arguments(
        sub.add_parser("precompile", help="engine-start compile time, cold Triton cache")
    )


@contextlib.contextmanager
def cold_triton_cache() -> Iterator[None]:
    """Inside the block Triton compiles everything again: a new, empty cache directory, and
    none of this package's kernels compiled in this process."""
    from triton import knobs

    from vllm_portable_attn.kernels.compile_only import jit_kernels

    previous = knobs.cache.dir
    with tempfile.TemporaryDirectory(prefix="portable-attn-triton-") as cache_dir:
        knobs.cache.dir = cache_dir
        for _, _, fn in jit_kernels():
            fn.device_caches.clear()
        try:
            yield
        finally:
            knobs.cache.dir = previous


@contextlib.contextmanager
def precompiles_recorded(threads: int, record: list[Any]) -> Iterator[None]:
    """The impl's precompile runs on `threads` threads inside the block, and appends its
    `CompileCount` and seconds to `record`. (The impl looks the function up at call time.)"""
    from vllm_portable_attn import impl as impl_module

    real = impl_module.precompile_step_shapes

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        count = real(*args, threads=threads, **kwargs)
        record.append((count, time.perf_counter() - started))
        return count

    impl_module.precompile_step_shapes = timed
    try:
        yield
    finally:
        impl_module.precompile_step_shapes = real


def time_precompile(layer: Any, step: Any, threads: int) -> dict[str, Any]:
    """One cold precompile of `layer` at its first step, `step`, on `threads` threads."""
    import torch

    record: list[Any] = []
    with cold_triton_cache(), precompiles_recorded(threads, record):
        layer.impl._precompile_pending = True
        md = layer.build(layer.inputs.load(step))
        layer.kv_cache_update(md)
        layer.forward(md)
        torch.cuda.synchronize()
    if len(record) != 1:
        raise RuntimeError(f"the forward ran {len(record)} precompiles, not one")
    count, seconds = record[0]
    return {"seconds": seconds, "compiled": count.compiled, "launches": count.launches}


def run(args: argparse.Namespace) -> int:
    """The ``precompile`` subcommand."""
    import torch

    if not torch.cuda.is_available():
        print("precompile: needs a CUDA device (compiles for it and loads the kernels)")
        return 2
    import _vllm_steps as S

    from vllm_portable_attn import precompile
    from vllm_portable_attn.kernels.compile_only import compile_threads

    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    for route in routes:
        if route not in ROUTES:
            raise SystemExit(f"unknown route {route!r}; choose from {', '.join(ROUTES)}")
    own = compile_threads(precompile.COMPILE_THREADS)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, own})
    info = C.run_info()
    print(
        f"GPU {info['gpu']}; torch {info['torch']}, triton {info['triton']}, vllm "
        f"{info['vllm']}; commit {info['git_commit']}; the backend compiles on {own} threads",
        flush=True,
    )
    geo = S.Geometry()
    warmup = S.mixed_step(1, 2, 1, 20)  # vLLM 0.26's warm-up: a 2-token prompt and a decode
    inputs = S.RunnerInputs(
        geo,
        "cuda",
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        max_model_len=8704,
        num_blocks=64,
    )
    rows: list[dict[str, Any]] = []
    ok = True
    for route in routes:
        layer = S.PortableLayer(inputs, route)
        for threads in thread_counts:
            row = {"kind": "precompile", "route": route, "threads": threads, "model": "llama-8b"}
            try:
                row |= time_precompile(layer, warmup, threads)
            except Exception as e:  # noqa: BLE001 - report the run and go on
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"
                ok = False
            full = C.stamp(row)
            rows.append(full)
            C.append_jsonl(args.out, [full])
            print(_format_row(full), flush=True)
        counts = {r.get("compiled") for r in rows if r["route"] == route}
        if len(counts) != 1:
            print(f"precompile: {route}: runs compiled different counts {sorted(counts)}")
            ok = False
    print(summary(rows, ok))
    return 0 if ok else 1


def _format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['route']:8s} {r['threads']:3d} threads  ERROR {r['error']}"
    return (
        f"{r['route']:8s} {r['threads']:3d} threads  {r['seconds']:6.1f} s  "
        f"{r['compiled']:3d} specialisations  {r['launches']:4d} launches"
    )


def summary(rows: Sequence[dict[str, Any]], ok: bool) -> str:
    """One line: per route, seconds at each thread count and the speed-up of the last."""
    parts = []
    for route in dict.fromkeys(r["route"] for r in rows):
        runs = [r for r in rows if r["route"] == route and "error" not in r]
        if not runs:
            parts.append(f"{route} failed")
            continue
        times = " / ".join(f"{r['threads']}t {r['seconds']:.1f} s" for r in runs)
        speedup = runs[0]["seconds"] / runs[-1]["seconds"] if len(runs) > 1 else 1.0
        parts.append(f"{route} {times} ({speedup:.1f}x, {runs[0]['compiled']} compiled)")
    return f"SUMMARY: precompile {'ok' if ok else 'FAILED'}: " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    return run(add_arguments(argparse.ArgumentParser(description=__doc__)).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
