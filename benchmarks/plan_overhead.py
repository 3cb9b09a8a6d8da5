#!/usr/bin/env python3
"""K7, per-step overhead of our backend: ``python3 benchmarks/bench.py plan``.

The goal (shared/docs/performance.md, K7): the plan is built in <= 20 us of CPU time, with no
device->host synchronisation, and no Triton compile happens after warm-up.

For each route (``unified``, ``grouped``), our metadata builder and impl are built on vLLM's
real config objects (benchmarks/_vllm_steps.py) and fed vLLM's ``CommonAttentionMetadata`` for
realistic steps of a Llama-3.1-8B attention layer (32 query / 8 KV heads, head size 128, bf16,
blocks of 16): decode batches of 1, 64 and 256 at 4k context, and 2 fresh 2k prompts with 32
decodes at 1k in one step. Then:

1. warm-up, per step: a few builds, one KV-cache write, one forward;
2. timing, per step: ``--builds`` calls of ``builder.build(...)``, each timed alone on the host
   clock, with ``torch.cuda.set_sync_debug_mode("error")`` on, so a device->host sync inside
   ``build`` raises. The mode is first shown to be armed (a deliberate ``.item()`` must raise).
   CUDA caching-allocator allocations made by the builds are counted too (the plan promises
   none);
3. compile check: Triton's ``knobs.runtime.jit_post_compile_hook`` counts JIT compiles. After
   the warm-up, a second pass over the same steps plus copies with other lengths (builds, cache
   write and forward, still under the sync check) must compile nothing;
4. information: host time to enqueue ``impl.forward`` and the cache write (no synchronize) on
   the largest decode step.

Rows go to ``--out`` (JSON lines, stamped like bench.py's rows); a table and one ``SUMMARY:``
line go to stdout. Exit status 1 if a sync or a compile after warm-up was seen, the sync check
could not be armed, or a step failed; the 20 us target is reported, not enforced (host timings
are noisy on shared machines).

``--device cpu`` runs the same code under Triton's interpreter with a small geometry, to test
the harness: its timings mean nothing, and there is neither a sync nor a compile check.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (needs the line above; also puts the repo root on sys.path)

from vllm_portable_attn import envs  # noqa: E402  (cheap: no vLLM, torch or Triton)

#: K7's bound on the CPU time of one build, in microseconds.
TARGET_BUILD_US = 20.0
ROUTES: tuple[str, ...] = get_args(envs.Route)

# Defaults per device: (heads, kv heads, head size, block size, dtype), decode batches, decode
# context, mixed step "PREFILLSxLEN+DECODESxCTX", max_num_seqs, max_num_batched_tokens,
# max_model_len. CUDA: Llama-3.1-8B at vLLM's defaults for an H100/H200 server (1024 sequences,
# 8192 batched tokens). CPU: small enough for Triton's interpreter (which has no bf16 math).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": dict(
        geometry=(32, 8, 128, 16, "bfloat16"),
        decode_batches="1,64,256",
        ctx=4096,
        mixed="2x2048+32x1024",
        max_num_seqs=1024,
        max_num_batched_tokens=8192,
        max_model_len=32768,
        builds=2000,
        warmup_builds=50,
        check_builds=20,
        forward_calls=200,
    ),
    "cpu": dict(
        geometry=(8, 2, 64, 16, "float16"),
        decode_batches="1,4",
        ctx=64,
        mixed="2x40+4x64",
        max_num_seqs=64,
        max_num_batched_tokens=512,
        max_model_len=1024,
        builds=20,
        warmup_builds=2,
        check_builds=1,
        forward_calls=2,
    ),
}


# ============================================================================================
# Command line
# ============================================================================================


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the ``plan`` subcommand (and of this file run on its own)."""
    p.add_argument("--routes", default=",".join(ROUTES), help="comma list of kernel routes")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: Triton interpreter, small geometry, harness test only (timings meaningless)",
    )
    p.add_argument("--decode-batches", help="comma list of decode batch sizes (cuda: 1,64,256)")
    p.add_argument("--ctx", type=int, help="context length of the decode steps (cuda: 4096)")
    p.add_argument(
        "--mixed",
        help="mixed step as PREFILLSxLEN+DECODESxCTX (cuda: 2x2048+32x1024); 'none' to skip",
    )
    p.add_argument("--builds", type=int, help="timed builds per step (cuda: 2000)")
    p.add_argument("--warmup-builds", type=int, help="untimed builds per step (cuda: 50)")
    p.add_argument(
        "--check-builds",
        type=int,
        help="builds per step in the compile / sync check pass, then one cache write and "
        "forward (cuda: 20)",
    )
    p.add_argument(
        "--forward-calls", type=int, help="timed forward enqueues, information (cuda: 200)"
    )
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-kv-heads", type=int)
    p.add_argument("--head-size", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-num-seqs", type=int, help="scheduler max_num_seqs (cuda: 1024)")
    p.add_argument(
        "--max-num-batched-tokens", type=int, help="scheduler max_num_batched_tokens (cuda: 8192)"
    )
    p.add_argument("--max-model-len", type=int, help="block-table width in tokens (cuda: 32768)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append JSON rows to this file")
    return p


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``plan`` subcommand on bench.py's subparsers."""
    return add_arguments(
        sub.add_parser("plan", help="K7: metadata-build CPU time, no syncs, no compiles")
    )


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Options with the device's defaults filled in."""
    d = DEFAULTS[args.device]
    heads, kv_heads, head_size, block_size, dtype = d["geometry"]
    return dict(
        routes=[r.strip() for r in args.routes.split(",") if r.strip()],
        num_heads=args.num_heads or heads,
        num_kv_heads=args.num_kv_heads or kv_heads,
        head_size=args.head_size or head_size,
        block_size=args.block_size or block_size,
        dtype=args.dtype or dtype,
        decode_batches=[int(b) for b in (args.decode_batches or d["decode_batches"]).split(",")],
        ctx=args.ctx or d["ctx"],
        mixed=args.mixed or d["mixed"],
        max_num_seqs=args.max_num_seqs or d["max_num_seqs"],
        max_num_batched_tokens=args.max_num_batched_tokens or d["max_num_batched_tokens"],
        max_model_len=args.max_model_len or d["max_model_len"],
        builds=args.builds or d["builds"],
        warmup_builds=args.warmup_builds or d["warmup_builds"],
        check_builds=args.check_builds or d["check_builds"],
        forward_calls=args.forward_calls or d["forward_calls"],
    )


def _parse_mixed(spec: str) -> tuple[int, int, int, int] | None:
    """'2x2048+32x1024' -> (2, 2048, 32, 1024); 'none' -> None."""
    if spec.strip().lower() == "none":
        return None
    try:
        pre, dec = spec.split("+")
        n_pre, pre_len = (int(x) for x in pre.split("x"))
        n_dec, dec_ctx = (int(x) for x in dec.split("x"))
    except ValueError as err:
        raise SystemExit(f"--mixed {spec!r}: expected PREFILLSxLEN+DECODESxCTX") from err
    return n_pre, pre_len, n_dec, dec_ctx


# ============================================================================================
# Measuring
# ============================================================================================


@contextlib.contextmanager
def no_device_sync(enabled: bool) -> Iterator[None]:
    """Inside, any device->host synchronisation torch performs raises (CUDA only)."""
    if not enabled:
        yield
        return
    import torch

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def sync_check_armed(device: str) -> bool:
    """Whether a sync really raises inside :func:`no_device_sync` (else its silence proves
    nothing)."""
    import torch

    x = torch.ones(1, device=device)
    try:
        with no_device_sync(True):
            x.item()
    except RuntimeError:
        return True
    return False


class CompileCounter:
    """Counts Triton JIT compiles (new in-memory specialisations, loads from the on-disk cache
    included) through ``triton.knobs.runtime.jit_post_compile_hook``; chains any hook already set.
    """

    def __init__(self) -> None:
        self.kernels: list[str] = []  # one name per compile
        self.signatures: list[str] = []  # Triton's description of each specialisation compiled
        self._previous: Callable[..., Any] | None = None

    def __enter__(self) -> CompileCounter:
        import triton

        self._previous = triton.knobs.runtime.jit_post_compile_hook
        triton.knobs.runtime.jit_post_compile_hook = self._hook
        return self

    def __exit__(self, *exc: object) -> None:
        import triton

        triton.knobs.runtime.jit_post_compile_hook = self._previous

    def _hook(self, **kwargs: Any) -> Any:
        self.kernels.append(str(getattr(kwargs.get("fn"), "name", "?")))
        self.signatures.append(str(kwargs.get("repr", "?"))[:400])
        if self._previous is not None:
            return self._previous(**kwargs)
        return None

    @staticmethod
    def effective() -> bool:
        """False under TRITON_INTERPRET, where kernels are interpreted and never compiled."""
        import triton

        return not triton.knobs.runtime.interpret


def _allocations(cuda: bool) -> int:
    """Allocations the CUDA caching allocator has handed out so far (0 without CUDA)."""
    if not cuda:
        return 0
    import torch

    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    idx = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[idx]


def _stats_us(ns: Sequence[int]) -> dict[str, float]:
    us = sorted(x / 1e3 for x in ns)
    return {
        "median": statistics.median(us),
        "p90": _percentile(us, 90),
        "p99": _percentile(us, 99),
        "min": us[0],
        "mean": statistics.fmean(us),
    }


def time_builds(
    build: Callable[[], Any], n: int, *, cuda: bool, chunk: int = 100
) -> tuple[list[int], int]:
    """Host nanoseconds of ``n`` builds, each timed alone with sync errors on, and the CUDA
    allocations they made. The device is drained between chunks (outside the timed calls) so
    that a full launch queue never blocks a timed launch."""
    import torch

    times: list[int] = []
    allocs = 0
    clock = time.perf_counter_ns
    for start in range(0, n, chunk):
        before = _allocations(cuda)
        with no_device_sync(cuda):
            for _ in range(min(chunk, n - start)):
                t0 = clock()
                build()
                times.append(clock() - t0)
        allocs += _allocations(cuda) - before
        if cuda:
            torch.cuda.synchronize()
    return times, allocs


def time_host(fn: Callable[[], Any], n: int, *, cuda: bool, drain_every: int = 8) -> list[int]:
    """Host nanoseconds to enqueue ``fn`` (no synchronize inside the timed call)."""
    import torch

    times: list[int] = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
        if cuda and i % drain_every == drain_every - 1:
            torch.cuda.synchronize()
    if cuda:
        torch.cuda.synchronize()
    return times


# ============================================================================================
# The run
# ============================================================================================


def run(args: argparse.Namespace) -> int:
    """The ``plan`` subcommand."""
    if args.device == "cpu":
        # Must precede the first Triton import; kernels then run in Triton's interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("plan: no CUDA device (--device cpu exercises the harness in the interpreter)")
        return 2
    import _vllm_steps as S

    o = _resolve(args)
    for route in o["routes"]:
        if route not in ROUTES:
            raise SystemExit(f"unknown route {route!r}; choose from {', '.join(ROUTES)}")
    cuda = args.device == "cuda"
    dev = args.device
    geo = S.Geometry(o["num_heads"], o["num_kv_heads"], o["head_size"], o["block_size"], o["dtype"])
    steps = [S.decode_step(b, o["ctx"]) for b in o["decode_batches"]]
    mixed = _parse_mixed(o["mixed"])
    if mixed:
        steps.append(S.mixed_step(*mixed))
    rng = random.Random(args.seed)
    other_lengths = [s.other_lengths(rng, geo.block_size - 1) for s in steps]
    forward_step = max((s for s in steps if s.max_query_len == 1), key=lambda s: s.num_reqs)

    info = C.run_info()
    print(
        f"GPU {info['gpu']} ({info['num_sms']} SMs); torch {info['torch']}, triton "
        f"{info['triton']}, vllm {info['vllm']}; commit {info['git_commit']}",
        flush=True,
    )
    if not cuda:
        print("plan: --device cpu under Triton's interpreter: timings mean nothing", flush=True)
    base = {
        "kind": "plan",
        "device": dev,
        "num_heads": geo.num_heads,
        "num_kv_heads": geo.num_kv_heads,
        "head_size": geo.head_size,
        "block_size": geo.block_size,
        "dtype": geo.dtype_name,
        "max_num_seqs": o["max_num_seqs"],
        "max_num_batched_tokens": o["max_num_batched_tokens"],
    }
    armed = sync_check_armed(dev) if cuda else None
    compile_check = CompileCounter.effective()
    if cuda and not armed:
        print("plan: torch's sync debug mode did not raise on .item(): sync check NOT armed")

    inputs = S.RunnerInputs(
        geo,
        dev,
        max_num_seqs=o["max_num_seqs"],
        max_num_batched_tokens=o["max_num_batched_tokens"],
        max_model_len=o["max_model_len"],
        num_blocks=1 + max(s.num_blocks(geo.block_size) for s in steps),
        seed=args.seed,
    )
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        full = C.stamp({**base, **row})
        rows.append(full)
        C.append_jsonl(args.out, [full])

    with CompileCounter() as counter:
        for route in o["routes"]:
            try:
                layer = S.PortableLayer(inputs, route)
            except Exception as e:  # noqa: BLE001 - report the route and go on
                emit({"what": "error", "route": route, "error": f"{type(e).__name__}: {e}"})
                print(f"{route}: could not build the layer: {e}", flush=True)
                continue
            try:
                _run_route(layer, route, steps, other_lengths, forward_step, o, cuda, armed,
                           compile_check, counter, emit)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - report the route and go on
                traceback.print_exc()
                emit({"what": "error", "route": route, "error": f"{type(e).__name__}: {e}"})
                if cuda:
                    torch.cuda.synchronize()
            del layer
            gc.collect()

    print()
    print(plan_table(rows))
    print(plan_summary(rows, armed, compile_check, cuda))
    return 0 if plan_ok(rows, armed, cuda) else 1


def _run_route(
    layer: Any,
    route: str,
    steps: list[Any],
    other_lengths: list[Any],
    forward_step: Any,
    o: dict[str, Any],
    cuda: bool,
    armed: bool | None,
    compile_check: bool,
    counter: CompileCounter,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    """Warm-up, timed builds, forward enqueue time and the compile / sync pass of one route."""
    import torch

    def drain() -> None:
        if cuda:
            torch.cuda.synchronize()

    inputs = layer.inputs
    # 1. Warm-up: every specialisation a step needs gets compiled here.
    # The outputs are checked to be finite: a harness feeding the kernels nonsense would time
    # nonsense.
    mark = len(counter.kernels)
    not_finite: list[str] = []
    for step in steps:
        cm = inputs.load(step)
        for _ in range(o["warmup_builds"]):
            md = layer.build(cm)
        layer.kv_cache_update(md)
        out = layer.forward(md)
        if not bool(out[: step.num_tokens].isfinite().all()):
            not_finite.append(step.name)
        drain()
    warmup_compiles = counter.kernels[mark:]

    # 2. Timed builds.
    for step in steps:
        cm = inputs.load(step)
        md = layer.build(cm)
        drain()
        gc.collect()
        row: dict[str, Any] = {
            "what": "build",
            "route": route,
            "step": step.name,
            "num_reqs": step.num_reqs,
            "num_tokens": step.num_tokens,
            "max_query_len": step.max_query_len,
            "max_seq_len": step.max_seq_len,
            "num_segments": md.num_segments,
            "group_sizes": md.group_sizes,
            "builds": o["builds"],
            "sync_checked": bool(armed),
            "target_us": TARGET_BUILD_US,
        }
        try:
            ns, allocs = time_builds(lambda cm=cm: layer.build(cm), o["builds"], cuda=cuda)
        except RuntimeError as e:  # a sync under the debug mode, or a failing build
            drain()
            row.update(sync_free=False if "synchroniz" in str(e) else None, error=str(e)[:300])
        else:
            st = _stats_us(ns)
            row.update({f"build_us_{k}": v for k, v in st.items()})
            row.update(
                sync_free=True if armed else None,
                cuda_allocs_per_build=allocs / len(ns) if cuda else None,
                within_target=st["p90"] <= TARGET_BUILD_US if cuda else None,
            )
        emit(row)
        _print_build_row(row)

    # 3. Information: host time to enqueue the layer's two ops on the largest decode step.
    cm = inputs.load(forward_step)
    md = layer.build(cm)
    layer.kv_cache_update(md)
    layer.forward(md)
    drain()
    fwd = _stats_us(time_host(lambda: layer.forward(md), o["forward_calls"], cuda=cuda))
    upd = _stats_us(time_host(lambda: layer.kv_cache_update(md), o["forward_calls"], cuda=cuda))
    emit(
        {
            "what": "launch",
            "route": route,
            "step": forward_step.name,
            "calls": o["forward_calls"],
            "forward_host_us_median": fwd["median"],
            "forward_host_us_p90": fwd["p90"],
            "kv_update_host_us_median": upd["median"],
            "kv_update_host_us_p90": upd["p90"],
            "num_segments": md.num_segments,
        }
    )
    print(
        f"{route:<8} {forward_step.name:<24} forward enqueue {fwd['median']:8.1f} us median, "
        f"cache write {upd['median']:7.1f} us (host time, no synchronize)",
        flush=True,
    )

    # 4. After warm-up: the same steps and other lengths, builds + cache write + forward, under
    # the sync check; Triton must compile nothing.
    mark = len(counter.kernels)
    errors: list[str] = []
    checked = 0
    for step in steps + other_lengths:
        cm = inputs.load(step)
        try:
            with no_device_sync(cuda):
                for _ in range(o["check_builds"]):
                    md = layer.build(cm)
                layer.kv_cache_update(md)
                layer.forward(md)
            checked += 1
        except RuntimeError as e:
            errors.append(f"{step.name}: {str(e)[:200]}")
        drain()
    after = counter.kernels[mark:]
    row = {
        "what": "compiles",
        "route": route,
        "compile_check": compile_check,
        "compiles_warmup": len(warmup_compiles) if compile_check else None,
        "kernels_warmup": sorted(set(warmup_compiles)),
        "compiles_after_warmup": len(after) if compile_check else None,
        "kernels_after_warmup": sorted(set(after)),
        # what was specialised anew (first few), to find the argument that changed
        "signatures_after_warmup": counter.signatures[mark : mark + 5],
        "steps_checked": [s.name for s in steps + other_lengths],
        "steps_ok": checked,
        "sync_checked": bool(armed),
        "sync_free": (not errors) if armed else None,
        "errors": errors + [f"{name}: output not finite" for name in not_finite],
    }
    emit(row)
    print(
        f"{route:<8} Triton compiles: warm-up "
        f"{row['compiles_warmup'] if compile_check else 'n/a (interpreter)'}, after warm-up "
        f"{row['compiles_after_warmup'] if compile_check else 'n/a'}"
        + (f" ({', '.join(row['kernels_after_warmup'])})" if after else "")
        + f"; {checked}/{len(steps) + len(other_lengths)} steps ran"
        + (" sync-free" if armed and not errors else "")
        + (f"; ERRORS: {'; '.join(errors)}" if errors else ""),
        flush=True,
    )


# ============================================================================================
# Reporting
# ============================================================================================


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _print_build_row(r: dict[str, Any]) -> None:
    if r.get("error"):
        print(f"{r['route']:<8} {r['step']:<24} ERROR {r['error']}", flush=True)
        return
    print(
        f"{r['route']:<8} {r['step']:<24} build {r['build_us_median']:6.1f} us median, "
        f"{r['build_us_p90']:6.1f} p90, {r['build_us_p99']:6.1f} p99"
        + (f", {r['cuda_allocs_per_build']:.2f} allocs/build" if r.get("sync_checked") else "")
        + (", no sync" if r.get("sync_free") else ""),
        flush=True,
    )


def plan_table(rows: list[dict[str, Any]]) -> str:
    """The build timings as a fixed-width table."""
    body = []
    for r in rows:
        if r.get("what") != "build":
            continue
        body.append(
            (
                r["route"],
                r["step"],
                r["num_reqs"],
                r["num_tokens"],
                _f(r.get("build_us_median"), ".1f"),
                _f(r.get("build_us_p90"), ".1f"),
                _f(r.get("build_us_p99"), ".1f"),
                _f(r.get("cuda_allocs_per_build"), ".2f"),
                {True: "none", False: "SYNC", None: "unchecked"}[r.get("sync_free")],
                r["num_segments"],
                ("ERR " + r["error"][:40]) if r.get("error") else "",
            )
        )
    return C.fmt_table(
        ["route", "step", "reqs", "tokens", "median us", "p90 us", "p99 us", "allocs/build",
         "syncs", "segs", "note"],
        body,
    )  # fmt: skip


def plan_ok(rows: list[dict[str, Any]], armed: bool | None, cuda: bool) -> bool:
    """No errors, no sync, no compile after warm-up, and (on CUDA) a sync check that works."""
    if cuda and not armed:
        return False
    for r in rows:
        if r.get("error") or r.get("errors") or r.get("sync_free") is False:
            return False
        if r.get("what") == "compiles" and r.get("compiles_after_warmup"):
            return False
    return bool(rows)


def _short(step_name: str) -> str:
    """'decode_b256_ctx4k' -> 'b256', 'mixed_2p2k_32d1k' -> 'mixed' (for the SUMMARY line)."""
    if step_name.startswith("decode_b"):
        return step_name.split("_")[1]
    return step_name.split("_")[0]


def plan_summary(
    rows: list[dict[str, Any]], armed: bool | None, compile_check: bool, cuda: bool
) -> str:
    """The one ``SUMMARY:`` line scripts/gpu_session.sh keeps (its first 300 characters are
    shown there, so the verdicts come first)."""
    builds = [r for r in rows if r.get("what") == "build" and "build_us_p90" in r]
    parts: list[str] = []
    if builds:
        worst = max(builds, key=lambda r: r["build_us_p90"])
        verdict = (
            ("ok" if worst["build_us_p90"] <= TARGET_BUILD_US else "MISSED")
            if cuda
            else "cpu, meaningless"
        )
        parts.append(
            f"build p90 max {worst['build_us_p90']:.1f} us ({worst['route']} "
            f"{_short(worst['step'])}; target {TARGET_BUILD_US:.0f}: {verdict})"
        )
    if cuda:
        synced = [r for r in rows if r.get("sync_free") is False]
        parts.append(
            "syncs: check NOT armed"
            if not armed
            else (f"syncs: {len(synced)} rows SYNCED" if synced else "syncs: none")
        )
    comp = [r for r in rows if r.get("what") == "compiles"]
    if comp and compile_check:
        total = sum(r["compiles_after_warmup"] or 0 for r in comp)
        parts.append(
            f"compiles after warm-up: {total} ("
            + ", ".join(f"{r['route']} {r['compiles_after_warmup']}" for r in comp)
            + ")"
        )
    elif comp:
        parts.append("compiles: n/a (interpreter)")
    errs = [r for r in rows if r.get("error") or r.get("errors")]
    if errs:
        parts.append(f"{len(errs)} rows with errors")
    for route in ROUTES:
        mine = [r for r in builds if r["route"] == route]
        if mine:
            parts.append(
                f"{route} median us "
                + " ".join(f"{_short(r['step'])} {r['build_us_median']:.1f}" for r in mine)
            )
    for r in rows:
        if r.get("what") == "launch":
            parts.append(
                f"{r['route']} forward enqueue {r['forward_host_us_median']:.1f} us "
                f"({_short(r['step'])})"
            )
    return "SUMMARY: plan: " + ("; ".join(parts) if parts else "no rows")


def main(argv: Sequence[str] | None = None) -> int:
    """Run as ``python3 benchmarks/plan_overhead.py [options]`` (same options as ``plan``)."""
    ap = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
