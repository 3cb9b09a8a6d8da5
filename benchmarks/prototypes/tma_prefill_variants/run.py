"""TMA prefill variants against the product kernel and torch's cuDNN / flash SDPA (session H).

    OUT=/tmp/out python3 benchmarks/prototypes/tma_prefill_variants/run.py   # writes $OUT/pv.jsonl
    SMOKE=1 TRITON_INTERPRET=1 python3 benchmarks/prototypes/tma_prefill_variants/run.py  # CPU

A measuring prototype, kept because benchmarks/NOTES.md (session H) and the product kernel's
docstring quote its numbers: it ran on an H200 at commit 6baf234, whose product kernel was the
one-program-per-(query block, head) grid; `results/h200-h-tma-variants-scratch-2026-11-30.jsonl`
holds its rows. The code is as it ran, reformatted. Run today, "product" is the persistent
kernel that came out of it. Variants (`variants.py`): MASK 0 the product's causal mask, 1 none
(wrong results: a bound on what the mask costs), 2 a per-row limit, 3 an additive mask; ORDER 0
a (blocks, heads) grid, 1 a 1-D grid with a block's heads as neighbours; `kern_persistent` one
program per SM taking work items round-robin. Each variant's output is compared with the
product's first. (The two kernels of that run are one here, with a PERSISTENT switch.)
"""

import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import variants  # noqa: E402

from vllm_portable_attn.kernels import tma_prefill as prod  # noqa: E402
from vllm_portable_attn.kernels.classify import (  # noqa: E402
    GROUP_PREFILL,
    RequestGroups,
    classify_requests,
)
from vllm_portable_attn.kernels.configs import tma_prefill_config  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
H, KVH, D = 32, 8, 128
SMOKE = os.environ.get("SMOKE") == "1"
BM = 16 if SMOKE else 128
TN = 16 if SMOKE else 128
DEV = "cpu" if SMOKE else "cuda"
CASES = (
    {"a": [40], "b": [33, 17, 5]}
    if SMOKE
    else {
        "8k": [8192],
        "4x4k": [4096] * 4,
        "16x1k": [1024] * 16,
        "16k": [16384],
        "1x4k": [4096],
        "1x2k": [2048],
        "2x2k": [2048] * 2,
        "3mix": [3000, 1500, 700],
    }
)
VARIANTS = [
    ("kern", 0, 0),
    ("kern", 1, 0),
    ("kern", 2, 0),
    ("kern", 3, 0),
    ("kern", 0, 1),
    ("kern", 2, 1),
    ("kern_persistent", 0, 1),
    ("kern_persistent", 2, 1),
]


def sync() -> None:
    if not SMOKE:
        torch.cuda.synchronize()


def bench(fn) -> float:
    if SMOKE:
        fn()
        return 1.0
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median") * 1000


def sdpa_rows(case, lens, q, k, v, flops):
    """cuDNN's and torch's flash SDPA on equal-length batches (K/V heads repeated)."""
    rows = []
    batch, length = len(lens), lens[0]
    qb = q.view(batch, length, H, D).transpose(1, 2).contiguous()
    kb = k.view(batch, length, KVH, D).transpose(1, 2).repeat_interleave(4, 1).contiguous()
    vb = v.view(batch, length, KVH, D).transpose(1, 2).repeat_interleave(4, 1).contiguous()
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("torch_flash", SDPBackend.FLASH_ATTENTION),
    ):
        try:
            with sdpa_kernel(backend):

                def run_sdpa():
                    return torch.nn.functional.scaled_dot_product_attention(
                        qb, kb, vb, is_causal=True
                    )

                run_sdpa()
                sync()
                t = bench(run_sdpa)
            rows.append(dict(case=case, variant=name, us=t, tflops=flops / t / 1e6))
            print(rows[-1], flush=True)
        except Exception as e:
            print(case, name, "failed", str(e)[:200], flush=True)
    return rows


def run_case(case, lens, sms):
    torch.manual_seed(0)
    rows = []
    T = sum(lens)
    dtype = torch.float16 if SMOKE else torch.bfloat16
    qkv = torch.randn(T, (H + 2 * KVH) * D, device=DEV, dtype=dtype)
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)
    v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
    qsl = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    groups = RequestGroups.allocate(256, DEV)
    classify_requests(qsl, seq_lens, groups, 8)
    cfg = tma_prefill_config(10**9, H)
    assert cfg.block_m == BM and cfg.tile_n == TN, cfg
    flops = sum(4 * L * (L + 1) / 2 * D * H for L in lens)
    ref_out = torch.full_like(q, float("nan"))

    def prod_fn():
        prod.tma_prefill_attention(
            q, k, v, ref_out, qsl, groups.as_tuple(), group=GROUP_PREFILL,
            group_size=(T, len(lens)), softmax_scale=D**-0.5, config=cfg,
        )  # fmt: skip

    prod_fn()
    sync()
    # The product against SDPA in fp32 on the first two sequences of at most 4k tokens.
    err = 0.0
    for a, b in list(zip(qsl[:-1].tolist(), qsl[1:].tolist(), strict=True))[:2]:
        if b - a > 4096:
            continue
        r = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1).float(),
            k[a:b].transpose(0, 1).float().repeat_interleave(4, 0),
            v[a:b].transpose(0, 1).float().repeat_interleave(4, 0),
            is_causal=True,
        ).transpose(0, 1)
        err = max(err, (ref_out[a:b].float() - r).abs().max().item())
    t = bench(prod_fn)
    rows.append(dict(case=case, variant="product", us=t, tflops=flops / t / 1e6, err_vs_sdpa=err))
    print(rows[-1], flush=True)
    if len(set(lens)) == 1 and not SMOKE:
        rows += sdpa_rows(case, lens, q, k, v, flops)
    num_blocks = T // BM + len(lens)
    for fn_name, mask, order in VARIANTS:
        out = torch.full_like(q, float("nan"))
        persistent = fn_name == "kern_persistent"
        if persistent:
            grid = (min(sms, num_blocks * H),)
        elif order == 0:
            grid = (num_blocks, H)
        else:
            grid = (num_blocks * H,)

        def call(grid=grid, out=out, mask=mask, order=order, persistent=persistent):
            variants.kern[grid](
                q, k, v, out, qsl, groups.seq_order, groups.order_cu_q, groups.group_bounds,
                T, num_blocks, D**-0.5, q.stride(0), k.stride(0), v.stride(0), out.stride(0),
                out.stride(1), NUM_HEADS=H, NUM_KV_HEADS=KVH, QUERIES_PER_KV=H // KVH, HEAD=D,
                BLOCK_M=BM, TILE_N=TN, GROUP=GROUP_PREFILL,
                SEARCH_STEPS=groups.seq_order.shape[0].bit_length(), MASK=mask, ORDER=order,
                PERSISTENT=persistent, num_warps=4, num_stages=2,
            )  # fmt: skip

        try:
            t0 = time.time()
            call()
            sync()
            first_call_s = time.time() - t0
            diff = (out.float() - ref_out.float()).abs().max().item()
            t = bench(call)
        except Exception as e:
            print(case, fn_name, mask, order, "failed", str(e)[:300], flush=True)
            continue
        rows.append(
            dict(
                case=case, variant=f"{fn_name}:mask{mask}:order{order}", us=t,
                tflops=flops / t / 1e6, max_diff_vs_product=diff, first_call_s=first_call_s,
            )
        )  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    sms = 3 if SMOKE else torch.cuda.get_device_properties(0).multi_processor_count
    prod._ensure_scratch_allocator(torch.device(DEV))
    rows = [r for case, lens in CASES.items() for r in run_case(case, lens, sms)]
    meta = dict(
        gpu=None if SMOKE else torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        ts=time.strftime("%Y-%m-%dT%H:%M:%S"),
        commit=os.popen("git rev-parse --short HEAD").read().strip(),
    )
    with open(f"{OUT}/pv.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(dict(meta, **r)) + "\n")
    print(f"\n{'case':<6} {'variant':<34} {'us':>9} {'TFLOP/s':>7}")
    for r in rows:
        print(f"{r['case']:<6} {r['variant']:<34} {r['us']:>9.1f} {r['tflops']:>7.1f}")


if __name__ == "__main__":
    main()
