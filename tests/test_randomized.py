"""Randomized batches against the reference (hypothesis): any mix of decodes, spec-verify
steps, extends and fresh prompts, in any order, with padding, on both routes and with random
score features. Small sizes under the interpreter; the GPU variant draws larger batches."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_check import run_and_check
from paged_batch import make_batch


@st.composite
def requests(draw: st.DrawFn, max_len: int) -> list[tuple[int, int]]:
    """(query_len, context_len) pairs: context 0 is a fresh prompt, q <= 8 a decode-like step."""
    request = st.tuples(st.integers(1, max_len), st.integers(0, max_len))
    return draw(st.lists(request, min_size=1, max_size=6))


@st.composite
def features(draw: st.DrawFn) -> dict:
    chosen: dict = {}
    if draw(st.booleans()):
        chosen["sliding_window"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        chosen["softcap"] = draw(st.floats(1.0, 50.0))
    if draw(st.booleans()):
        chosen["causal"] = False
    return chosen


def check(reqs, feats, provider, padded, split, page_size, heads, size) -> None:
    batch = make_batch(
        reqs,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_size=size,
        page_size=page_size,
        dtype=torch.float16,
        device=DEVICE,
        num_padded_requests=padded,
        num_padding_tokens=padded,
        seed=len(reqs) * 131 + page_size,
    )
    # Split-KV only where the builder would allow it (a small batch); split is (segments,
    # whether the grid counts as narrow: the *_split_narrow rows).
    segments, narrow = split if batch.query.shape[0] <= 64 else (1, False)
    run_and_check(batch, provider=provider, num_segments=segments, narrow_split=narrow, **feats)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU variant below covers this at larger sizes")
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    reqs=requests(max_len=40),
    feats=features(),
    provider=st.sampled_from(["unified", "grouped"]),
    padded=st.integers(0, 2),
    split=st.sampled_from([(1, False), (4, False), (4, True)]),
    page_size=st.sampled_from([16, 32]),
    heads=st.sampled_from([(4, 1), (8, 2), (6, 2)]),
)
def test_random_batches(reqs, feats, provider, padded, split, page_size, heads) -> None:
    check(reqs, feats, provider, padded, split, page_size, heads, size=32)


@pytest.mark.gpu
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    reqs=requests(max_len=1500),
    feats=features(),
    provider=st.sampled_from(["unified", "grouped"]),
    padded=st.integers(0, 3),
    split=st.sampled_from([(1, False), (8, False), (8, True)]),
    page_size=st.sampled_from([16, 64]),
    heads=st.sampled_from([(32, 8), (16, 1), (28, 4)]),
)
def test_gpu_random_batches(reqs, feats, provider, padded, split, page_size, heads) -> None:
    check(reqs, feats, provider, padded, split, page_size, heads, size=128)
