"""The grouped route (classifier + per-group kernels) against the reference, in any batch order.

vLLM's V1 runner orders decode -> extend -> prefill only when asked; the V2 runner puts decodes
first and then sorts by query length, so a short fresh prompt can precede a long extend. The
grouped route must not care, so every case runs in several orders.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from conftest import DEVICE
from kernel_check import host_group_sizes, run_and_check
from paged_batch import make_batch

from vllm_portable_attn.kernels import (
    GROUP_DECODE,
    GROUP_EXTEND,
    GROUP_PADDING,
    GROUP_PREFILL,
    RequestGroups,
    classify_requests,
)
from vllm_portable_attn.kernels import grouped as grouped_module
from vllm_portable_attn.kernels.configs import attention_config, tma_prefill_config

DECODES = [(1, 33), (1, 7), (4, 20)]  # (query_len, context_len); q 4 is a spec-verify step
EXTENDS = [(40, 17), (9, 100)]  # chunked-prefill continuations / prefix-cache hits
PREFILLS = [(5, 0), (70, 0)]


def v1_order() -> list[tuple[int, int]]:
    return DECODES + EXTENDS + PREFILLS


def v2_order() -> list[tuple[int, int]]:
    """Decodes first, then everything else by ascending query length."""
    return DECODES + sorted(EXTENDS + PREFILLS, key=lambda r: r[0])


def random_order() -> list[tuple[int, int]]:
    requests = v1_order()
    random.Random(5).shuffle(requests)
    return requests


ORDERS = {
    "v1": v1_order(),
    "v2": v2_order(),
    "random": random_order(),
    "all_decode": DECODES,
    "all_prefill": PREFILLS,
    "prefix_hits": EXTENDS,
}


def batch(requests: list[tuple[int, int]], **overrides: object):
    kwargs = dict(
        num_heads=8,
        num_kv_heads=2,
        head_size=32,
        page_size=16,
        dtype=torch.float16,
        device=DEVICE,
        num_padded_requests=1,
        num_padding_tokens=2,
    )
    kwargs.update(overrides)
    return make_batch(requests, **kwargs)


@pytest.mark.parametrize("tma_prefill", [True, False], ids=["tma", "portable"])
@pytest.mark.parametrize("order", ORDERS)
def test_grouped_matches_reference(order: str, tma_prefill: bool) -> None:
    """Fresh prefills through the TMA kernel (the interpreter's table has no minimum size) and
    through the portable dense kernel."""
    run_and_check(batch(ORDERS[order]), provider="grouped", tma_prefill=tma_prefill)


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the minimum grid decides (large_prefills)")
def test_prefill_group_takes_the_tma_kernel(spy: Callable[[object, str], list[dict]]) -> None:
    """The dispatch itself: eligible fresh prefills go to the TMA kernel, once per call; a
    score modifier or a non-16-bit dtype keeps them on the portable kernel. (The interpreter's
    table row has no minimum grid.)"""
    calls = spy(grouped_module, "tma_prefill_attention")
    run_and_check(batch(v1_order()), provider="grouped")
    assert [call["group"] for call in calls] == [GROUP_PREFILL]
    run_and_check(batch(v1_order()), provider="grouped", softcap=3.0)
    run_and_check(batch(v1_order(), dtype=torch.float32), provider="grouped")
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("requests", "sized", "decode_len"),
    [
        ([(1, 30), (40, 0), (1, 50)], True, 1),  # single-token decodes beside a prefill
        ([(3, 30), (40, 0), (1, 50)], True, 8),  # a verify query: the step's bound holds it
        ([(1, 30), (40, 0), (1, 50)], False, 8),  # sizes unknown (a capture): the bound too
    ],
    ids=["decodes", "verify", "capture"],
)
def test_decode_group_tile_follows_its_queries(
    requests: list, sized: bool, decode_len: int, spy: Callable[[object, str], list[dict]]
) -> None:
    """In a step with a long prefill, single-token decodes keep the decode tile (the spec-verify
    tile holds an SM per program); the outputs match the reference either way."""
    calls = spy(grouped_module, "launch_attention")
    b = batch(requests)
    run_and_check(b, provider="grouped")  # sized, then as in a capture
    decode_configs = [c["config"] for c in calls if c["group"] == GROUP_DECODE]
    assert len(decode_configs) == 2
    shape = "decode" if decode_len == 1 else "spec"
    pad_d, pad_q = 32, 4  # batch(): head size 32, 8 query heads per 2 KV heads
    expected = attention_config(pad_d, pad_q, decode_len, shape, b.query.element_size())
    assert decode_configs[0 if sized else 1] == expected


@pytest.mark.parametrize("provider", ["unified", "grouped"])
def test_v2_order_extend_keeps_its_context(provider: str) -> None:
    """The V2 hazard itself: a 5-token fresh prompt sorted before a 40-token extend."""
    run_and_check(batch([(1, 9), (5, 0), (40, 300)]), provider=provider)


@pytest.mark.parametrize("num_segments", [2, 8])
def test_grouped_split_kv(num_segments: int) -> None:
    """Small batches split the decode group; a short fresh prompt rides along unsplit."""
    run_and_check(batch([(1, 90), (3, 0), (2, 40)]), provider="grouped", num_segments=num_segments)


@pytest.mark.parametrize(
    "features",
    [dict(sliding_window=9), dict(softcap=3.0), dict(causal=False)],
    ids=["window", "softcap", "noncausal"],
)
def test_grouped_features(features: dict) -> None:
    run_and_check(batch(random_order()), provider="grouped", **features)


def test_classifier_groups_and_order() -> None:
    requests = [(70, 0), (1, 5), (0, 0), (9, 100), (3, 3), (5, 0), (1, 1)]
    b = make_batch(
        requests,
        num_heads=2,
        num_kv_heads=1,
        head_size=16,
        page_size=16,
        dtype=torch.float32,
        device=DEVICE,
    )
    groups = RequestGroups.allocate(10, DEVICE)
    classify_requests(b.query_start_loc, b.seq_lens, groups, decode_threshold=8)
    expected = {
        GROUP_DECODE: [1, 4, 6],
        GROUP_EXTEND: [3],
        GROUP_PREFILL: [0, 5],
        GROUP_PADDING: [2],
    }
    bounds = groups.group_bounds.tolist()
    assert bounds == [0, 3, 4, 6, 7]
    order = groups.seq_order[: len(requests)].tolist()
    for group, members in expected.items():
        assert order[bounds[group] : bounds[group + 1]] == members
    q_lens = [requests[i][0] for i in order]
    cumulative = [sum(q_lens[:i]) for i in range(len(q_lens) + 1)]
    assert groups.order_cu_q[: len(requests) + 1].tolist() == cumulative


# --------------------------------------------------------------------- GPU, at real sizes

GPU_ORDERS = {
    "v1": [(1, 3000), (1, 70), (6, 900), (700, 1500), (300, 4000), (1000, 0), (17, 0)],
    "v2": [(1, 3000), (1, 70), (6, 900), (17, 0), (300, 4000), (700, 1500), (1000, 0)],
}


def gpu_batch(requests: list[tuple[int, int]], **overrides: object):
    """A Llama-8B-shaped batch (32 query / 8 KV heads, head 128, pages of 16) on the GPU."""
    kwargs = dict(
        num_heads=32,
        num_kv_heads=8,
        head_size=128,
        page_size=16,
        dtype=torch.bfloat16,
        device="cuda",
    )
    kwargs.update(overrides)
    return make_batch(requests, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("order", list(GPU_ORDERS) + ["shuffled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_grouped(order: str, dtype: torch.dtype) -> None:
    requests = GPU_ORDERS.get(order) or random.Random(3).sample(GPU_ORDERS["v1"], 7)
    b = gpu_batch(requests, dtype=dtype, num_padded_requests=2, num_padding_tokens=4)
    run_and_check(b, provider="grouped")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "features",
    [
        dict(fp8=torch.float8_e4m3fn),
        dict(fp8=torch.float8_e5m2),
        dict(sliding_window=300),
        dict(sinks=True),
    ],
    ids=["fp8", "fp8_e5m2", "window", "sinks"],
)
def test_gpu_grouped_features(features: dict) -> None:
    b = gpu_batch(GPU_ORDERS["v2"])
    if features.get("sinks"):
        features = dict(sinks=torch.randn(32, device="cuda"))
    run_and_check(b, provider="grouped", **features)


# Prefill work for several rounds of the TMA prefill's persistent grid on sm_90 (4129 prefill
# tokens x 32 heads / 128 rows: about 1070 work items), with decodes and an extend in the batch.
GPU_TMA_BATCH = [(1, 3000), (2600, 0), (1, 70), (300, 4000), (1400, 0), (129, 0), (6, 900)]


@pytest.mark.gpu
@pytest.mark.parametrize("tma_prefill", [True, False], ids=["tma", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_grouped_large_prefills(tma_prefill: bool, dtype: torch.dtype) -> None:
    b = gpu_batch(GPU_TMA_BATCH, dtype=dtype, num_padded_requests=2, num_padding_tokens=4)
    if tma_prefill and torch.cuda.get_device_capability()[0] == 9:
        _, _, (tokens, _) = host_group_sizes(b)
        assert tma_prefill_config(tokens, 32) is not None, "not the TMA kernel's size"
    run_and_check(b, provider="grouped", tma_prefill=tma_prefill)


@pytest.mark.gpu
@pytest.mark.parametrize("num_segments", [4, 16])
def test_gpu_grouped_split(num_segments: int) -> None:
    b = gpu_batch([(1, 9000), (4, 3000), (8, 0), (1, 20)])
    run_and_check(b, provider="grouped", num_segments=num_segments)
