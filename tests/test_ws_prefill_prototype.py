"""benchmarks/prototypes/ws_prefill.py (a benchmark prototype) against a plain fp64 reference.

On the CPU this runs Triton's interpreter: it checks the indexing (GQA rows from a 3-D TMA box,
sequences found from the static grid, causal masking across sequence boundaries), not the
warp specialisation, which only the sm90 compiler performs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from prototypes.ws_prefill import ws_prefill  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def causal_reference(query, key, value, query_start_loc, scale):
    """Per sequence, softmax(q k^T * scale) v under a causal mask, in fp64."""
    out = torch.empty(query.shape, dtype=torch.float64)
    group = query.shape[1] // key.shape[1]
    bounds = query_start_loc.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        q = query[lo:hi].double().transpose(0, 1)  # [heads, n, d]
        k = key[lo:hi].double().repeat_interleave(group, dim=1).transpose(0, 1)
        v = value[lo:hi].double().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = q @ k.transpose(1, 2) * scale
        causal = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out[lo:hi] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_ws_prefill_matches_reference(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 37, 1, 64, 18]
    num_heads, num_kv_heads = heads
    head_size = 32
    num_tokens = sum(lengths)
    # Q, K and V as column slices of one projection output, as vLLM hands them over.
    widths = [num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size]
    qkv = torch.randn(num_tokens, sum(widths), generator=gen).to(dtype)
    query, key, value = (part.view(num_tokens, -1, head_size) for part in qkv.split(widths, dim=1))
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    query_start_loc = torch.tensor(starts, dtype=torch.int32)
    output = torch.full_like(query, float("nan"))
    scale = head_size**-0.5
    args = [t.to(DEVICE) for t in (query, key, value, output, query_start_loc)]
    ws_prefill(*args, softmax_scale=scale, block_m=32, tile_n=16)
    got = args[3].cpu()
    assert not got.isnan().any(), "rows left unwritten"
    ref = causal_reference(query, key, value, query_start_loc, scale)
    tol = 2e-4 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
