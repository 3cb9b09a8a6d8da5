"""Compile the backend's kernel specialisations for NVIDIA and AMD targets, on a CPU.

    python3 -m vllm_portable_attn.compile_check [--quick | --full] [--targets sm80,sm90,...]
        [--jobs N] [--json PATH] [--list]

Why: the CPU test suite runs the kernels in Triton's interpreter, which never runs the GPU
compiler, so a kernel that fails to lower (or spills registers) on one architecture would only
show up on that hardware. Triton can compile for any target without a GPU or a driver: this
tool does so for sm_80 (A100), sm_90a (H100/H200), gfx942 (MI300) and gfx950 (MI350), prints
registers, shared memory / LDS and spills per kernel and target (the table comes last), and
exits non-zero on any compile error, on any kernel that asks for more shared memory / LDS
than the target has (Triton would refuse to launch it), and on register spills in the hot
paths (the attention kernel and the split-KV merge). Spills elsewhere are reported, not fatal;
so are hot-path spills under a Triton release other than the one the config tables were tuned
with (`configs.TUNED_TRITON`): those mean "retune", not "broken".

Which specialisations: every constexpr combination is thousands of compiles, so the default
(CI) set sweeps each axis around one base case (bf16, head size 128, GQA 4, page 16): every
supported head size, each dtype and the fp8 KV caches (e4m3, e5m2), GQA 1 / 3 / 8, page 64,
decode, spec-verify and prefill-shaped tiles, split-KV with its merge, each feature switch
alone and all together, both routes (the grouped route's decode / extend / dense and paged
prefill launches, and the TMA prefill that long prefills take on sm_90), the cache writer and
the classifier: about 275 unique compiles, 6 minutes on two cores. `--quick` compiles each
kernel and route once (about 30, under half a minute); `--full` widens every sweep (about 1500,
for a machine with many cores).

How the specialisations are found (no hand-written signatures): the real public launchers
(`unified_attention`, `grouped_attention`, `merge_segments` through them, `classify_requests`,
`write_kv_cache`) run on "meta" tensors (shapes, strides and dtypes, no memory) while every
`@triton.jit` object of the kernel package has its `run` replaced by a recorder, so
`kernel[grid](...)` records its arguments instead of launching. Each recorded call then goes
through Triton's own argument binder for the target's backend, exactly as a real launch would,
which yields the signature, constexprs and specialisation attributes (16-byte divisibility,
int == 1, AMD buffer-op ranges). The per-architecture config table is consulted as for the
target ('ampere' for sm_80, 'hopper' for sm_90, 'cdna' for gfx9xx), not as for this machine.

What is realistic about the recorded launches, and why it matters for codegen:
  * KV caches are views into one storage larger than 2 GiB, as in serving, so AMD does not
    mark them for 32-bit buffer addressing (small tensors such as the query are marked, as in
    serving). One case uses a small cache to cover the other AMD variant.
  * The query and the new K/V are views of one fused QKV buffer, the block table is a view of
    a wider table and the split-KV workspace has the builder's size, so every stride has the
    divisibility it has in vLLM.
  * fp8 caches use the platform's fp8 type: e4m3fn on sm_90 and gfx950, e4m3fnuz on gfx942;
    sm_80 has no e4m3 KV cache (the backend refuses it below compute capability 8.9). An
    fp8_e5m2 cache is e5m2 on sm_90 only (the backend needs sm_89 for either fp8, and refuses
    e5m2 on ROCm).

Register and spill counts come from `ptxas -v` for NVIDIA (the report of the ptxas run Triton
makes anyway, or, for a kernel taken from Triton's cache, of Triton's ptxas run again on the
cached PTX with Triton's flags), and from the kernel metadata in the AMDGCN assembly for AMD.
"Spill" means spills to memory: NVIDIA spill stores/loads, AMD VGPR spills to scratch. AMD SGPR
spills go to VGPR lanes, not memory, so they are reported only.

Not covered: runtime behaviour (no kernel runs), performance, and hardware-specific
correctness; `IS_CAUSAL=False` (the backend refuses non-causal attention, so it never launches
it); Triton's on-disk cache is used as usual, so a second run is much faster.

It needs Triton with its NVIDIA and AMD backends (the standard `triton` wheel has both) and
torch; it does not import vLLM. It cannot work under `TRITON_INTERPRET=1` (kernels are then
interpreted functions with nothing to compile), so when run as a script it re-executes itself
without that variable.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget

from vllm_portable_attn.kernels import configs
from vllm_portable_attn.kernels.cache_write import write_kv_cache
from vllm_portable_attn.kernels.classify import RequestGroups, classify_requests
from vllm_portable_attn.kernels.compile_only import run_replaced
from vllm_portable_attn.kernels.configs import (
    MAX_DECODE_QUERY_LEN,
    MAX_SEGMENTS,
    MAX_SPLIT_TOKENS,
)
from vllm_portable_attn.kernels.grouped import grouped_attention
from vllm_portable_attn.kernels.split_kv import SplitKVWorkspace
from vllm_portable_attn.kernels.unified import unified_attention

#: Head sizes the backend declares (backend.SUPPORTED_HEAD_SIZES; a test keeps them equal).
#: Kept here because importing the backend imports vLLM.
HEAD_SIZES: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 256)

#: Kernels whose spills fail the check: they run in every layer of every step.
HOT_KERNELS = frozenset({"attention_kernel", "_merge_segments_kernel", "_tma_prefill_kernel"})

#: Hot-path spills are fatal with the Triton release the config tables were tuned with; with
#: another one they are reported as SPILL(untuned) (a retuning job, not a broken build).
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
SPILLS_FATAL = TRITON_VERSION == configs.TUNED_TRITON

#: A KV cache this large (bytes) is what serving allocates; AMD's buffer ops need < 2 GiB.
_LARGE_CACHE_BYTES = 2**31 + 2**20


@dataclass(frozen=True)
class Target:
    """One compilation target and what the backend would use on it."""

    name: str
    backend: str  # GPUTarget backend: "cuda" or "hip"
    arch: int | str  # compute capability (cuda) or gfx name (hip)
    warp_size: int
    table_arch: str  # row of configs._TABLE used on this hardware
    fp8_dtype: torch.dtype | None  # the platform's fp8 KV-cache type; None: fp8 KV refused
    # Shared memory / LDS one program may use; Triton refuses to launch a kernel asking more.
    max_shared: int

    def gpu_target(self) -> GPUTarget:
        return GPUTarget(self.backend, self.arch, self.warp_size)

    def cache_dtype(self, kv: str) -> torch.dtype | None:
        """The cache element type of a scenario's fp8 dtype here; None: the backend refuses it.

        e5m2 follows e4m3 on NVIDIA (same capability rule) and is refused on ROCm.
        """
        if kv == "fp8_e5m2":
            has_fp8 = self.backend == "cuda" and self.fp8_dtype is not None
            return torch.float8_e5m2 if has_fp8 else None
        return self.fp8_dtype


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        # A100: 163 KiB of shared memory per block (opt-in); H100/H200: 227 KiB.
        Target("sm80", "cuda", 80, 32, "ampere", None, 166912),
        Target("sm90", "cuda", 90, 32, "hopper", torch.float8_e4m3fn, 232448),
        # vLLM's ROCm platform uses the fnuz fp8 variant on gfx94x, OCP e4m3fn on gfx950.
        # LDS per workgroup: 64 KiB on MI300, 160 KiB on MI350.
        Target("gfx942", "hip", "gfx942", 64, "cdna", torch.float8_e4m3fnuz, 65536),
        Target("gfx950", "hip", "gfx950", 64, "cdna", torch.float8_e4m3fn, 163840),
    )
}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Scenario dtypes meaning a bf16 model with an fp8 KV cache (vLLM's kv_cache_dtype strings).
_FP8_KV = ("fp8", "fp8_e5m2")


@dataclass(frozen=True)
class Scenario:
    """One forward step of one layer, as the backend would run it.

    dtype is the model dtype, or "fp8" / "fp8_e5m2": a bf16 model with that fp8 KV cache.
    route "unified" writes the cache and runs `unified_attention` (as impl.py does); "grouped"
    writes the cache, classifies the requests and runs `grouped_attention`.
    max_query_len picks the tile shape: 1 decode, 2..8 spec-verify, larger a mixed batch.
    """

    route: str
    dtype: str = "bf16"
    head_size: int = 128
    gqa: int = 4
    page_size: int = 16
    max_query_len: int = 1
    num_segments: int = 1
    narrow_split: bool = False  # a split over few requests (the *_split_narrow rows)
    num_kv_heads: int = 8
    sliding_window: int | None = None
    softcap: float | None = None
    alibi: bool = False
    sinks: bool = False
    large_cache: bool = True
    kv_sharing: bool = False  # a layer reading another layer's cache: no dense prefill
    max_num_seqs: int = 256  # the classifier's capacity (vLLM's max_num_seqs)

    @property
    def name(self) -> str:
        phase = {1: "decode"}.get(self.max_query_len, f"q{self.max_query_len}")
        if self.max_query_len > MAX_DECODE_QUERY_LEN:
            phase = "mixed"
        parts = [
            self.route,
            self.dtype,
            f"d{self.head_size}",
            f"gqa{self.gqa}",
            f"kv{self.num_kv_heads}",
            f"p{self.page_size}",
            phase,
        ]
        if self.num_segments > 1:
            parts.append(f"split{self.num_segments}" + ("narrow" if self.narrow_split else ""))
        features = [
            ("swa", self.sliding_window is not None),
            ("softcap", self.softcap is not None),
            ("alibi", self.alibi),
            ("sinks", self.sinks),
            ("smallcache", not self.large_cache),
            ("kvshare", self.kv_sharing),
        ]
        parts += [tag for tag, on in features if on]
        return "-".join(parts)


def quick_scenarios() -> list[Scenario]:
    """Every kernel once: unified split-KV decode (attention, merge, cache write) and a grouped
    mixed batch (classifier, decode / extend / dense-prefill attention)."""
    return [
        Scenario("unified", max_query_len=1, num_segments=8),
        Scenario("grouped", max_query_len=512),
        Scenario("grouped", max_query_len=_LONG_PREFILL),
    ]


_MIXED = 512  # a max_query_len that makes a batch prefill-shaped (mixed)
# A batch with enough prefill tokens for the TMA prefill's minimum grid (sm_90 only).
_LONG_PREFILL = 8192
_ALL_FEATURES: dict[str, Any] = {
    "sliding_window": 4096,
    "softcap": 30.0,
    "alibi": True,
    "sinks": True,
}


def default_scenarios() -> list[Scenario]:
    """The CI set (about 50 attention specialisations per target): each axis swept around one
    base case (bf16, D 128, GQA 4, page 16); the cross product is thousands of compiles."""
    decode, mixed = Scenario("unified"), Scenario("unified", max_query_len=_MIXED)
    s: list[Scenario] = []
    # Every supported head size, decode- and prefill-shaped.
    s += [replace(p, head_size=d) for d in HEAD_SIZES for p in (decode, mixed)]
    # The other model dtypes, and fp8 KV caches (e4m3, e5m2) under a bf16 model.
    s += [replace(p, dtype=t) for t in ("fp16", "fp32", *_FP8_KV) for p in (decode, mixed)]
    # GQA: MHA, a non-power-of-two group (padded rows), a wide group; spec-verify tiles.
    s += [replace(mixed, gqa=g) for g in (1, 3, 8)]
    s += [replace(decode, gqa=3)]
    s += [replace(decode, gqa=g, max_query_len=4) for g in (4, 8)]
    # Spec-verify split: 16 rows (spec_split), 32 (spec_split_tall), and narrow grids (the
    # *_split_narrow rows), decode split too.
    spec_split = replace(decode, max_query_len=4, num_segments=8)
    s += [spec_split, replace(spec_split, max_query_len=8)]
    s += [replace(p, narrow_split=True) for p in (spec_split, replace(decode, num_segments=8))]
    s += [replace(mixed, page_size=64)]
    # Split-KV partials and the merge; 32 segments at D 256 is the merge's largest tile.
    s += [replace(decode, num_segments=8), replace(decode, head_size=256, num_segments=32)]
    # Feature switches one at a time (prefill-shaped: the most registers), then all at once.
    s += [replace(mixed, **{k: v}) for k, v in _ALL_FEATURES.items()]
    s += [replace(decode, **_ALL_FEATURES)]
    # The grouped route: a mixed batch (decode tiles of 8 queries, extend, dense prefill), a
    # pure decode batch with split-KV, fp8 (prefill through the cache), every feature.
    grouped = Scenario("grouped", max_query_len=_MIXED)
    s += [grouped, Scenario("grouped", num_segments=8)]
    # fp8 dequantised in the split decode and spec-verify tiles.
    s += [replace(decode, dtype="fp8", num_segments=8, max_query_len=q) for q in (1, 4)]
    s += [replace(grouped, dtype=t) for t in _FP8_KV]
    s += [replace(grouped, **_ALL_FEATURES), replace(grouped, kv_sharing=True)]
    # Long prefills: the TMA prefill on sm_90, in both 16-bit types. (Head 64 on the grouped
    # route is left out: its 8-query decode tile spills on sm_80, as do the Ampere spec-verify
    # tiles at several head sizes; NOTES.md, session E.)
    long_prefill = replace(grouped, max_query_len=_LONG_PREFILL)
    s += [long_prefill, replace(long_prefill, dtype="fp16")]
    # AMD marks caches under 2 GiB (small models / GPUs) for buffer ops: the other variant.
    s += [replace(mixed, large_cache=False)]
    return s


def full_scenarios() -> list[Scenario]:
    """A wider sweep for a machine with many cores (about four times the default)."""
    decode, mixed = Scenario("unified"), Scenario("unified", max_query_len=_MIXED)
    phases = (decode, mixed)
    s = default_scenarios()
    s += [replace(p, dtype=t, head_size=d) for t in ("fp16", "fp32", *_FP8_KV)
          for d in HEAD_SIZES for p in phases]  # fmt: skip
    s += [replace(p, gqa=g, head_size=d) for g in (1, 3, 8) for d in (64, 256) for p in phases]
    s += [replace(decode, max_query_len=q, gqa=g) for q in (2, 8) for g in (1, 3, 4, 8)]
    s += [replace(p, page_size=64, head_size=d) for d in (64, 256) for p in phases]
    s += [replace(decode, head_size=d, num_segments=n, dtype=t) for d in HEAD_SIZES
          for n in (2, 8, 32) for t in ("bf16", "fp32")]  # fmt: skip
    s += [replace(p, head_size=d, **_ALL_FEATURES) for d in (64, 256) for p in phases]
    grouped = Scenario("grouped", max_query_len=_MIXED)
    s += [replace(grouped, head_size=d, dtype=t) for d in HEAD_SIZES
          for t in ("bf16", "fp16", "fp32", "fp8")]  # fmt: skip
    s += [Scenario("grouped", max_query_len=q, gqa=g) for q in (1, 2, 4, 8) for g in (1, 3, 8)]
    s += [Scenario("grouped", max_query_len=_MIXED, gqa=g) for g in (1, 3, 8)]
    s += [replace(decode, num_kv_heads=k) for k in (1, 2, 4, 16)]
    s += [replace(grouped, max_num_seqs=n) for n in (128, 512, 1024)]
    return s


# -- capture ---------------------------------------------------------------------------------


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)` call."""

    module: str
    kernel: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    scenario: str


@contextlib.contextmanager
def _recording(launches: list[Launch], scenario: str) -> Iterator[None]:
    """Inside the block, `kernel[grid](...)` records its arguments instead of launching."""

    def recorder(module: str, name: str, fn: Any) -> Any:
        del fn

        def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            del grid, warmup
            launches.append(Launch(module, name, args, kwargs, scenario))

        return run

    with run_replaced(recorder):
        yield


@contextlib.contextmanager
def _config_arch(table_arch: str) -> Iterator[None]:
    """Make configs look up `table_arch`'s rows, as they would on that hardware."""
    original = configs._arch
    configs._arch = lambda: table_arch
    configs.attention_config.cache_clear()
    try:
        yield
    finally:
        configs._arch = original
        configs.attention_config.cache_clear()


def _run_scenario(sc: Scenario, target: Target, device: str = "meta") -> None:
    """Call the public launchers as the backend would for one step of one layer.

    On "meta" (the check itself) no tensor has memory. On a real device (to compare this tool's
    compiles with real launches on a GPU) the batch metadata gets valid values, so the kernels
    can actually run: every page is block 0 and no slot is written.
    """
    meta = torch.device(device)
    fp8 = sc.dtype in _FP8_KV
    dtype = torch.bfloat16 if fp8 else _DTYPES[sc.dtype]
    cache_dtype = target.cache_dtype(sc.dtype) if fp8 else dtype
    assert cache_dtype is not None
    kvh, d, page = sc.num_kv_heads, sc.head_size, sc.page_size
    heads = kvh * sc.gqa

    if sc.max_query_len >= _LONG_PREFILL:
        q_lens = [1, 1, 7, sc.max_query_len - 7]  # decodes, a spec-verify, a long prefill
    elif sc.max_query_len > MAX_DECODE_QUERY_LEN:
        q_lens = [1, 1, sc.max_query_len - 7, 7]  # decodes, a long extend, a short prefill
    else:
        q_lens = [sc.max_query_len] * 4
    num_tokens = sum(q_lens)
    if sc.num_segments > 1 and num_tokens > MAX_SPLIT_TOKENS:
        raise ValueError(f"{sc.name}: split-KV needs at most {MAX_SPLIT_TOKENS} tokens")

    # vLLM's layout: query / key / value are views of the fused QKV projection output.
    qkv = torch.empty(num_tokens, (heads + 2 * kvh) * d, dtype=dtype, device=meta)
    query = qkv[:, : heads * d].view(num_tokens, heads, d)
    key = qkv[:, heads * d : (heads + kvh) * d].view(num_tokens, kvh, d)
    value = qkv[:, (heads + kvh) * d :].view(num_tokens, kvh, d)
    output = torch.empty(num_tokens, heads, d, dtype=dtype, device=meta)

    # The cache: a per-layer view [blocks, page, kv_heads, 2 * D] of one large allocation,
    # split into strided K and V views as impl._split_kv_cache does.
    num_blocks = 64
    elem = torch.empty(0, dtype=cache_dtype).element_size()
    cache_bytes = num_blocks * page * kvh * 2 * d * elem
    storage_bytes = _LARGE_CACHE_BYTES if sc.large_cache else cache_bytes
    raw = torch.empty(storage_bytes, dtype=torch.uint8, device=meta)
    physical = raw[:cache_bytes].view(cache_dtype).view(num_blocks, page, kvh, 2 * d)
    key_cache, value_cache = physical.split(d, dim=-1)

    num_reqs = len(q_lens)
    max_blocks = 8192 // page  # block-table row width for a max_model_len of 8192
    block_table = torch.empty(sc.max_num_seqs, max_blocks, dtype=torch.int32, device=meta)
    block_table = block_table[:num_reqs]
    query_start_loc = torch.empty(num_reqs + 1, dtype=torch.int32, device=meta)
    seq_lens = torch.empty(num_reqs, dtype=torch.int32, device=meta)
    slot_mapping = torch.empty(num_tokens, dtype=torch.int64, device=meta)
    k_scale = torch.empty((), dtype=torch.float32, device=meta) if fp8 else None
    v_scale = torch.empty((), dtype=torch.float32, device=meta) if fp8 else None
    alibi = torch.empty(heads, dtype=torch.float32, device=meta) if sc.alibi else None
    sinks = torch.empty(heads, dtype=torch.float32, device=meta) if sc.sinks else None
    if meta.type != "meta":
        starts = [sum(q_lens[:i]) for i in range(num_reqs + 1)]
        query_start_loc.copy_(torch.tensor(starts, dtype=torch.int32))
        # One request without context (a prefill), the others with 16 cached tokens.
        context = [16] * (num_reqs - 1) + [0]
        seq_lens.copy_(torch.tensor([q + c for q, c in zip(q_lens, context, strict=True)]))
        block_table.zero_()
        slot_mapping.fill_(-1)
        for t in (k_scale, v_scale):
            if t is not None:
                t.fill_(1.0)
        for t in (alibi, sinks):
            if t is not None:
                t.zero_()
    workspace = None
    if sc.num_segments > 1:
        workspace = SplitKVWorkspace.allocate(MAX_SPLIT_TOKENS, heads, d, MAX_SEGMENTS, meta)

    write_kv_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    common: dict[str, Any] = dict(
        max_query_len=sc.max_query_len,
        max_seq_len=8192,
        softmax_scale=d**-0.5,
        causal=True,
        sliding_window=sc.sliding_window,
        softcap=sc.softcap,
        alibi_slopes=alibi,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        num_segments=sc.num_segments,
        workspace=workspace,
        narrow_split=sc.narrow_split,
    )
    if sc.route == "unified":
        unified_attention(
            query, key_cache, value_cache, output, query_start_loc, seq_lens, block_table,
            **common,
        )  # fmt: skip
    elif sc.route == "grouped":
        groups = RequestGroups.allocate(sc.max_num_seqs, meta)
        classify_requests(query_start_loc, seq_lens, groups, MAX_DECODE_QUERY_LEN)
        # As impl.py: layers sharing another layer's cache pass no K/V (prefills read the cache).
        dense = not sc.kv_sharing
        # Every group launches; the last request is the prefill (its size picks the TMA path).
        whole_batch = (sum(q_lens), len(q_lens))
        grouped_attention(
            query, key if dense else None, value if dense else None, key_cache, value_cache,
            output, query_start_loc, seq_lens, block_table, groups,
            group_sizes=(whole_batch, whole_batch, (q_lens[-1], 1)), **common,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown route {sc.route!r}")


# -- binding and compiling -------------------------------------------------------------------


@dataclass
class CompileJob:
    """One unique (kernel, target, signature, constexprs, attributes, options) to compile."""

    module: str
    kernel: str
    target: str
    signature: dict[str, Any]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]
    scenarios: list[str] = field(default_factory=list)
    launch: str = ""  # what this launch is for (attention: route / group), for the table
    tile: str = ""  # BLOCK_M x TILE_N (attention), BLOCK (others)

    @property
    def key(self) -> str:
        return repr(
            (self.module, self.kernel, self.target, sorted(self.signature.items()),
             sorted(self.constexprs.items()), sorted(self.attrs.items()),
             sorted(self.options.items()))
        )  # fmt: skip


def _bind(launch: Launch, target: Target) -> CompileJob:
    """What a real launch of this call on `target` would compile, through Triton's binder."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    backend = make_backend(target.gpu_target())
    # As JITFunction.run fills them in before binding.
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    named = {p.name: bound_args[p.name] for p in fn.params if p.is_constexpr}
    return CompileJob(
        module=launch.module,
        kernel=launch.kernel,
        target=target.name,
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options=dict(options.__dict__),
        scenarios=[launch.scenario],
        launch=_describe_launch(named),
        tile=_describe_tile(named),
    )


_GROUP_NAMES = {-1: "unified", 0: "decode", 1: "extend", 2: "prefill"}


def _describe_launch(constexprs: dict[str, Any]) -> str:
    if "GROUP" not in constexprs:
        return ""
    role = _GROUP_NAMES.get(constexprs["GROUP"], str(constexprs["GROUP"]))
    if not constexprs.get("PAGED", True):
        role += " dense"
    if constexprs.get("NUM_SEGMENTS", 1) > 1:
        role += f" seg{constexprs['NUM_SEGMENTS']}"
    return role


def _describe_tile(constexprs: dict[str, Any]) -> str:
    if "BLOCK_M" in constexprs:
        return f"{constexprs['BLOCK_M']}x{constexprs['TILE_N']}"
    if "BLOCK" in constexprs:
        return str(constexprs["BLOCK"])
    if "NUM_SEGMENTS" in constexprs:
        return f"{constexprs['NUM_SEGMENTS']}x{constexprs['HEAD_PAD']}"
    return ""


def collect_jobs(scenarios: list[Scenario], targets: list[Target]) -> list[CompileJob]:
    """Run every scenario for every target and return the unique compiles, in first-seen order.

    A scenario a target cannot run (an e4m3 KV cache on sm_80, e5m2 on AMD) is skipped for that
    target.
    """
    jobs: dict[str, CompileJob] = {}
    for target in targets:
        with _config_arch(target.table_arch):
            for sc in scenarios:
                if sc.dtype in _FP8_KV and target.cache_dtype(sc.dtype) is None:
                    continue
                launches: list[Launch] = []
                try:
                    with _recording(launches, sc.name):
                        _run_scenario(sc, target)
                except Exception as exc:  # a launcher refused the case: say which one
                    raise RuntimeError(f"{sc.name} for {target.name}: {exc}") from exc
                for launch in launches:
                    job = _bind(launch, target)
                    if job.key in jobs:
                        jobs[job.key].scenarios.append(sc.name)
                    else:
                        jobs[job.key] = job
    return list(jobs.values())


@dataclass
class CompileResult:
    """Resource usage of one compiled specialisation, or the error that stopped it."""

    job: CompileJob
    seconds: float = 0.0
    error: str | None = None
    regs: str = ""  # NVIDIA: registers per thread; AMD: arch VGPRs / AGPRs / SGPRs
    shared_bytes: int = 0  # shared memory (NVIDIA) / LDS (AMD) per program
    spill_bytes: int = 0  # NVIDIA: spill stores + loads (bytes); AMD: VGPRs spilled
    spill_text: str = "0"
    scratch_bytes: int = 0  # NVIDIA stack frame / AMD private segment per thread
    kernel_hash: str = ""  # Triton's hash of the compiled kernel (matches a real launch's)

    @property
    def hot(self) -> bool:
        return self.job.kernel in HOT_KERNELS

    @property
    def status(self) -> str:
        if self.error is not None:
            return "ERROR"
        if self.shared_bytes > TARGETS[self.job.target].max_shared:
            return "SMEM"  # Triton would refuse the launch: out of shared memory / LDS
        if self.spill_bytes and not self.hot:
            return "spill(ok)"
        if self.spill_bytes:
            return "SPILL" if SPILLS_FATAL else "SPILL(untuned)"
        return "ok"

    @property
    def failed(self) -> bool:
        return self.status in ("ERROR", "SMEM", "SPILL")


def _nvidia_usage(ptx: str, capability: int, log: str | None, result: CompileResult) -> None:
    """Parse `ptxas -v`'s report: the one Triton's own ptxas run printed while compiling, or,
    when the kernel came from Triton's cache (no ptxas run), one from running Triton's ptxas
    again on the cached PTX with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    if not log or "Used" not in log:
        ptxas = get_ptxas(capability).path
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "kernel.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            cmd = [ptxas, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                   src, "-o", os.path.join(tmp, "kernel.cubin")]  # fmt: skip
            log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr

    def grab(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"ptxas -v output has no {pattern!r}:\n{log}")
        return int(match.group(1))

    stores = grab(r"(\d+) bytes spill stores")
    loads = grab(r"(\d+) bytes spill loads")
    result.regs = str(grab(r"Used (\d+) registers"))
    result.scratch_bytes = grab(r"(\d+) bytes stack frame")
    result.spill_bytes = stores + loads
    result.spill_text = f"{stores}B st/{loads}B ld" if stores + loads else "0"


def _amd_usage(amdgcn: str, result: CompileResult) -> None:
    """Read the kernel descriptor metadata the AMDGPU backend writes into the assembly."""

    def grab(key: str) -> int:
        match = re.search(rf"^[\s-]*\.{key}:\s+(\d+)", amdgcn, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no .{key} in the AMDGCN metadata")
        return int(match.group(1))

    vgpr, sgpr = grab("vgpr_count"), grab("sgpr_count")
    agpr = grab("agpr_count")
    vspill, sspill = grab("vgpr_spill_count"), grab("sgpr_spill_count")
    result.regs = f"{vgpr}v/{agpr}a/{sgpr}s"
    result.scratch_bytes = grab("private_segment_fixed_size")
    result.spill_bytes = vspill
    result.spill_text = "0" if not (vspill or sspill) else f"{vspill}v/{sspill}s"


def compile_job(job: CompileJob) -> CompileResult:
    """Compile one job for its target and measure it. Runs in a worker process."""
    from triton import knobs
    from triton.compiler import ASTSource

    target = TARGETS[job.target]
    result = CompileResult(job)
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(job.module), job.kernel)
        src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        # Triton already runs ptxas with -v; this knob makes it print that report (to stdout,
        # captured here) instead of discarding it, which saves a second ptxas run.
        knobs.nvidia.dump_ptxas_log = True
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            compiled = triton.compile(src, target=target.gpu_target(), options=job.options)
        result.shared_bytes = int(compiled.metadata.shared)
        result.kernel_hash = str(compiled.metadata.hash)
        if target.backend == "cuda":
            assert isinstance(target.arch, int)
            _nvidia_usage(compiled.asm["ptx"], target.arch, captured.getvalue(), result)
        else:
            _amd_usage(compiled.asm["amdgcn"], result)
    except Exception as exc:  # report every failure, keep compiling the rest
        lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
        result.error = "\n".join(lines[:40])
    result.seconds = time.perf_counter() - start
    return result


def _cost(job: CompileJob) -> int:
    """Rough compile cost, so the longest compiles start first and workers finish together."""
    if job.kernel != "attention_kernel":
        return 0
    names = list(job.signature)  # parameter order; constexprs are keyed by position
    block_m = job.constexprs.get((names.index("BLOCK_M"),), 0)
    head_pad = job.constexprs.get((names.index("HEAD_PAD"),), 0)
    fp32 = job.signature.get("query_ptr") == "*fp32"
    return int(block_m) * int(head_pad) * (4 if fp32 else 1)


def run_jobs(jobs: list[CompileJob], workers: int, progress: bool = True) -> list[CompileResult]:
    """Compile the jobs on `workers` processes, longest first.

    Spawned, not forked: the parent has imported torch, which is not fork-safe. The workers are
    terminated if this returns early (an exception, Ctrl-C, or SIGTERM from a CI timeout).
    """
    ordered = sorted(jobs, key=_cost, reverse=True)
    results: list[CompileResult] = []
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(ordered)) or 1)
        iterator: Iterator[CompileResult] = pool.imap_unordered(compile_job, ordered)
    else:
        iterator = map(compile_job, ordered)
    try:
        for i, res in enumerate(iterator, 1):
            results.append(res)
            if progress:
                print(
                    f"[{i}/{len(ordered)}] {res.job.target} {res.job.kernel} "
                    f"{res.job.scenarios[0]} {res.job.launch}: {res.status} ({res.seconds:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
        if pool is not None:
            pool.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return results


# -- report ----------------------------------------------------------------------------------


def format_table(results: list[CompileResult]) -> str:
    """A fixed-width table, one row per compiled specialisation."""
    order = {name: i for i, name in enumerate(TARGETS)}
    rows = sorted(
        results,
        key=lambda r: (r.job.kernel, order[r.job.target], r.job.scenarios[0], r.job.launch),
    )
    header = ("kernel", "target", "case (first of n)", "launch", "tile", "warps/st", "regs",
              "smem/LDS B", "scratch B", "spills", "status")  # fmt: skip
    lines = [header]
    for r in rows:
        case = r.job.scenarios[0]
        if len(r.job.scenarios) > 1:
            case += f" (+{len(r.job.scenarios) - 1})"
        lines.append((
            r.job.kernel, r.job.target, case, r.job.launch, r.job.tile,
            f"{r.job.options.get('num_warps')}/{r.job.options.get('num_stages')}",
            r.regs or "-", str(r.shared_bytes) if r.error is None else "-",
            str(r.scratch_bytes) if r.error is None else "-",
            r.spill_text if r.error is None else "-", r.status,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _results_json(results: list[CompileResult]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        row = asdict(r)
        job = row.pop("job")
        row.update(
            kernel=job["kernel"], target=job["target"], scenarios=job["scenarios"],
            launch=job["launch"], tile=job["tile"], num_warps=job["options"].get("num_warps"),
            num_stages=job["options"].get("num_stages"), status=r.status,
        )  # fmt: skip
        out.append(row)
    return out


def available_targets() -> list[str]:
    """Target names whose Triton backend is installed."""
    from triton.backends import backends

    have = {"cuda": "nvidia" in backends, "hip": "amd" in backends}
    return [name for name, t in TARGETS.items() if have[t.backend]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m vllm_portable_attn.compile_check",
        description="Compile every kernel specialisation for NVIDIA and AMD targets on a CPU "
        "and report registers, shared memory / LDS and spills.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one case per kernel and route")
    size.add_argument("--full", action="store_true", help="a wider sweep (many cores)")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)} (default: all)",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--list", action="store_true", help="list the unique compiles and exit without compiling"
    )
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    missing = [n for n in names if n not in available_targets()]
    if missing:
        print(f"error: this Triton has no backend for {missing}", file=sys.stderr)
        return 1

    started = time.perf_counter()
    # A CI timeout sends SIGTERM: exit through the `finally` that stops the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        scenarios = quick_scenarios()
    else:
        scenarios = full_scenarios() if args.full else default_scenarios()
    jobs = collect_jobs(scenarios, [TARGETS[n] for n in names])
    if args.list:
        for job in jobs:
            print(job.target, job.kernel, job.scenarios[0], job.launch, job.tile, sep="\t")
        return 0
    print(
        f"compile_check: {len(scenarios)} scenarios -> {len(jobs)} unique compiles for "
        f"{', '.join(names)} on {args.jobs} process(es); Triton {triton.__version__}",
        file=sys.stderr,
        flush=True,
    )
    results = run_jobs(jobs, max(args.jobs, 1))
    elapsed = time.perf_counter() - started

    if args.json:
        with open(args.json, "w") as f:
            json.dump(_results_json(results), f, indent=1)
    for r in results:
        if r.error is not None:
            print(f"\nERROR {r.job.kernel} on {r.job.target} ({r.job.scenarios[0]}):\n{r.error}")
    errors = sum(r.status == "ERROR" for r in results)
    over_smem = sum(r.status == "SMEM" for r in results)
    hot_spills = sum(r.status.startswith("SPILL") for r in results)
    cold_spills = sum(r.status == "spill(ok)" for r in results)
    verdict = "FAIL" if any(r.failed for r in results) else "OK"
    tuned = ".".join(map(str, configs.TUNED_TRITON))
    hot_note = "fatal" if SPILLS_FATAL else f"reported: configs are tuned with Triton {tuned}"
    print(
        f"\n{verdict}: {len(results)} compiles in {elapsed:.0f}s with Triton {triton.__version__}, "
        f"{errors} errors, {over_smem} over the shared memory / LDS limit (fatal: the launch "
        f"would fail), {hot_spills} hot-path spills ({hot_note}), {cold_spills} other spills "
        "(reported)\n"
    )
    print(format_table(results))
    return 1 if verdict == "FAIL" else 0


def _reexec_without_interpreter() -> None:
    """Interpreted kernels cannot be compiled; restart this command without TRITON_INTERPRET."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print("compile_check: TRITON_INTERPRET is set; re-running without it", file=sys.stderr)
        argv = [sys.executable, "-m", "vllm_portable_attn.compile_check", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    _reexec_without_interpreter()
    sys.exit(main())
