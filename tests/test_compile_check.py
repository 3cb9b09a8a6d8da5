"""The cross-target compile check (vllm_portable_attn.compile_check).

conftest.py sets TRITON_INTERPRET=1 on machines without a GPU, which turns every @triton.jit
kernel into an interpreted function that cannot be compiled; so everything that binds or
compiles runs in a subprocess with that variable removed. The quick subset compiles each kernel
once for one NVIDIA and one AMD target (about half a minute on two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vllm_portable_attn import compile_check as cc
from vllm_portable_attn.kernels.configs import _TABLE

REPO = Path(__file__).resolve().parents[1]
KERNELS = (
    "attention_kernel",
    "_merge_segments_kernel",
    "_classify_kernel",
    "_write_kv_cache_kernel",
)


def _have_amd_backend() -> bool:
    from triton.backends import backends

    return "amd" in backends


def _compiler_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _python(code: str) -> Any:
    """Run `code` without the interpreter; it prints one JSON value last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_compiler_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str, list[dict]]:
    targets = ["sm90"] + (["gfx942"] if _have_amd_backend() else [])
    out = tmp_path_factory.mktemp("compile_check") / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "vllm_portable_attn.compile_check", "--quick",
         "--targets", ",".join(targets), "--json", str(out)],
        env=_compiler_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"compile check failed:\n{done.stdout}\n{done.stderr[-5000:]}"
    return targets, done.stdout, json.loads(out.read_text())


def test_quick_compiles_every_kernel(quick_run: tuple[list[str], str, list[dict]]) -> None:
    targets, _, rows = quick_run
    assert rows and all(r["error"] is None for r in rows)
    for target in targets:
        compiled = {r["kernel"] for r in rows if r["target"] == target}
        # The TMA prefill exists on sm_90 only (configs.tma_prefill_config).
        expected = set(KERNELS) | ({"_tma_prefill_kernel"} if target == "sm90" else set())
        assert compiled == expected, (target, compiled)
    # The routes: the unified launch, the grouped route's three, the split-KV partials.
    launches = {r["launch"] for r in rows if r["kernel"] == "attention_kernel"}
    assert {"unified seg8", "decode", "extend", "prefill dense"} <= launches
    # Registers were measured (ptxas -v / AMDGCN metadata) for every row.
    assert all(r["regs"] for r in rows)


def test_quick_prints_the_table_last(quick_run: tuple[list[str], str, list[dict]]) -> None:
    targets, stdout, rows = quick_run
    lines = stdout.rstrip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kernel "))
    table = lines[header + 2 :]
    assert len(table) == len(rows)
    for kernel in KERNELS:
        for target in targets:
            assert any(row.split()[:2] == [kernel, target] for row in table), (kernel, target)
    assert "OK:" in stdout


def test_tma_prefill_compiles_warp_specialised_for_sm90() -> None:
    """The TMA prefill's speed comes from Triton's warp specialisation of its key loop (a
    producer and two consumer warp groups: 12 warps from 4). A kernel edit the sm_90 pass does
    not accept turns it off silently, so this compiles the kernel and looks."""
    found = _python(
        """
        import importlib, json, triton
        from triton.compiler import ASTSource
        from vllm_portable_attn import compile_check as cc
        target = cc.TARGETS["sm90"]
        jobs = cc.collect_jobs([cc.Scenario("grouped", max_query_len=8192)], [target])
        job = next(j for j in jobs if j.kernel == "_tma_prefill_kernel")
        fn = getattr(importlib.import_module(job.module), job.kernel)
        src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        k = triton.compile(src, target=target.gpu_target(), options=job.options)
        print(json.dumps({
            "asked": job.options["num_warps"],
            "warps": k.metadata.num_warps,
            "partitions": k.asm["ttgir"].count("ttg.warp_specialize"),
        }))
        """
    )
    assert found == {"asked": 4, "warps": 12, "partitions": 1}


@pytest.mark.skipif(not _have_amd_backend(), reason="this Triton has no AMD backend")
def test_binding_follows_each_target() -> None:
    """Launch parameters and specialisation come from the target, not from this machine."""
    found = _python(
        """
        import json
        from vllm_portable_attn import compile_check as cc
        sc = [cc.Scenario("unified", max_query_len=512, dtype="fp8")]
        jobs = cc.collect_jobs(sc, [cc.TARGETS[t] for t in cc.TARGETS])
        out = {}
        for j in jobs:
            if j.kernel != "attention_kernel":
                continue
            names = list(j.signature)
            const = {n: j.constexprs.get((i,)) for i, n in enumerate(names)}
            out[j.target] = {
                "config": [const["BLOCK_M"], const["TILE_N"], j.options["num_warps"],
                           j.options["num_stages"]],
                "key": j.signature["key_ptr"],
                "query_range": any("tt.pointer_range" in a[0] for a in j.attrs[(0,)]),
                "cache_range": any(
                    "tt.pointer_range" in a[0] for a in j.attrs[(names.index("key_ptr"),)]),
            }
        print(json.dumps(out))
        """
    )
    # The backend refuses an fp8 KV cache below compute capability 8.9, so sm80 has none.
    assert set(found) == {"sm90", "gfx942", "gfx950"}
    # Each target's row of the config table (D 128, GQA 4: block_m is the row's count).
    for target in found:
        row = _TABLE[(cc.TARGETS[target].table_arch, "prefill")]
        assert found[target]["config"] == list(row), target
    assert found["sm90"]["key"] == "*fp8e4nv"  # e4m3fn
    assert found["gfx942"]["key"] == "*fp8e4b8"  # e4m3fnuz, vLLM's fp8 on gfx94x
    assert found["gfx950"]["key"] == "*fp8e4nv"
    # AMD buffer ops: small tensors qualify, the (multi-GiB) KV cache does not.
    assert found["gfx942"]["query_range"] and not found["gfx942"]["cache_range"]
    assert not found["sm90"]["query_range"]


def test_tma_prefill_is_compiled_for_sm90_only() -> None:
    """Long fresh prefills take the TMA prefill on sm_90; the other targets have no row for it
    and keep the portable dense prefill."""
    found = _python(
        """
        import json
        from vllm_portable_attn import compile_check as cc
        sc = [cc.Scenario("grouped", max_query_len=8192)]
        jobs = cc.collect_jobs(sc, [cc.TARGETS[t] for t in cc.available_targets()])
        out = {}
        for j in jobs:
            if j.kernel == "_tma_prefill_kernel":
                out[j.target] = [j.signature["query_ptr"], j.signature["key_ptr"]]
        print(json.dumps(out))
        """
    )
    assert found == {"sm90": ["*bf16", "*bf16"]}


def test_e5m2_cache_is_compiled_for_nvidia_only() -> None:
    """fp8_e5m2: an e5m2 cache on sm90; sm80 and AMD skip it (the backend refuses it there)."""
    found = _python(
        """
        import json
        from vllm_portable_attn import compile_check as cc
        sc = [cc.Scenario("unified", dtype="fp8_e5m2")]
        jobs = cc.collect_jobs(sc, [cc.TARGETS[t] for t in cc.available_targets()])
        out = {}
        for j in jobs:
            arg = "key_ptr" if j.kernel == "attention_kernel" else "key_cache_ptr"
            out.setdefault(j.target, {})[j.kernel] = j.signature.get(arg)
        print(json.dumps(out))
        """
    )
    assert set(found) == {"sm90"}
    for target in found:
        assert found[target] == {"attention_kernel": "*fp8e5", "_write_kv_cache_kernel": "*fp8e5"}


def test_head_sizes_match_backend() -> None:
    from vllm_portable_attn.backend import SUPPORTED_HEAD_SIZES

    assert list(cc.HEAD_SIZES) == list(SUPPORTED_HEAD_SIZES)


def test_does_not_import_vllm() -> None:
    found = _python(
        """
        import json, sys
        import vllm_portable_attn.compile_check
        print(json.dumps(sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))))
        """
    )
    assert found == []


def _result(kernel: str, spill: int) -> cc.CompileResult:
    job = cc.CompileJob("m", kernel, "sm90", {}, {}, {}, {}, scenarios=["case"])
    return cc.CompileResult(job, spill_bytes=spill)


def test_only_hot_path_spills_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cc, "SPILLS_FATAL", True)  # the tuned Triton release
    assert _result("attention_kernel", 8).failed
    assert _result("_merge_segments_kernel", 8).failed
    assert not _result("_write_kv_cache_kernel", 8).failed
    assert _result("_write_kv_cache_kernel", 8).status == "spill(ok)"
    assert not _result("attention_kernel", 0).failed
    # Over the target's shared memory (227 KiB on sm90): Triton would refuse the launch.
    too_big = _result("_write_kv_cache_kernel", 0)
    too_big.shared_bytes = 232448 + 1
    assert too_big.failed and too_big.status == "SMEM"
    errored = _result("_classify_kernel", 0)
    errored.error = "boom"
    assert errored.failed and errored.status == "ERROR"


def test_hot_spills_under_an_untuned_triton_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cc, "SPILLS_FATAL", False)
    spilled = _result("attention_kernel", 8)
    assert spilled.status == "SPILL(untuned)" and not spilled.failed
    assert not _result("attention_kernel", 0).failed


def test_parses_amd_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cc, "SPILLS_FATAL", True)  # the tuned Triton release
    asm = textwrap.dedent(
        """
        amdhsa.kernels:
          - .agpr_count:     4
            .group_segment_fixed_size: 0
            .private_segment_fixed_size: 96
            .sgpr_count:     38
            .sgpr_spill_count: 2
            .vgpr_count:     128
            .vgpr_spill_count: 5
        """
    )
    res = _result("attention_kernel", 0)
    cc._amd_usage(asm, res)
    assert (res.regs, res.spill_bytes, res.scratch_bytes) == ("128v/4a/38s", 5, 96)
    assert res.spill_text == "5v/2s" and res.failed


def test_parses_ptxas_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cc, "SPILLS_FATAL", True)  # the tuned Triton release
    log = (
        "ptxas info    : Compiling entry function 'attention_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for attention_kernel\n"
        "    24 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cmem[0]\n"
    )
    res = _result("attention_kernel", 0)
    cc._nvidia_usage("", 90, log, res)
    assert (res.regs, res.spill_bytes, res.scratch_bytes) == ("255", 36, 24)
    assert res.status == "SPILL"
