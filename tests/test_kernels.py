"""The Triton kernels against the PyTorch reference.

Without a GPU they run under TRITON_INTERPRET=1 at small sizes in fp16/fp32 (the interpreter
has no bf16 arithmetic); the `gpu` cases run the same checks at real sizes in bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import DEVICE
from kernel_check import run_and_check
from paged_batch import PagedBatch, fp8_batch, fp8_written_caches, make_batch, scatter_new_tokens

from vllm_portable_attn.kernels import (
    GROUP_DECODE,
    MAX_SPLIT_TOKENS,
    choose_num_segments,
    configs,
    grouped,
    unified,
    unified_attention,
    write_kv_cache,
)

# (query_len, context_len): decodes, a chunked-prefill continuation, fresh prompts, odd lengths.
MIXED = [(1, 16), (17, 0), (63, 40), (1, 129), (5, 1), (129, 0)]
DECODES = [(1, 15), (1, 100), (1, 1), (1, 64)]
# The fp8 KV-cache types: kv_cache_dtype "fp8" / "fp8_e4m3" on CUDA, and "fp8_e5m2".
FP8_TYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def cpu_batch(requests: list[tuple[int, int]], **overrides: object) -> PagedBatch:
    kwargs = dict(
        num_heads=8, num_kv_heads=2, head_size=32, page_size=16, dtype=torch.float16,
        device=DEVICE,
    )  # fmt: skip
    kwargs.update(overrides)
    return make_batch(requests, **kwargs)


# ---------------------------------------------------------------- CPU, under the interpreter


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("page_size", [16, 32], ids=["page16", "page32"])
@pytest.mark.parametrize(
    "heads", [(8, 2), (16, 2), (4, 1), (6, 2)], ids=["gqa4", "gqa8", "mqa", "gqa3"]
)
def test_mixed_batch(dtype: torch.dtype, page_size: int, heads: tuple[int, int]) -> None:
    batch = cpu_batch(
        MIXED, num_heads=heads[0], num_kv_heads=heads[1], page_size=page_size, dtype=dtype,
        num_padded_requests=2, num_padding_tokens=3,
    )  # fmt: skip
    run_and_check(batch)


@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_head_sizes(head_size: int) -> None:
    run_and_check(cpu_batch([(1, 20), (19, 13), (33, 0)], head_size=head_size))


@pytest.mark.parametrize("num_segments", [2, 8, 32])
@pytest.mark.parametrize(
    "requests", [DECODES, [(3, 50), (1, 70), (8, 9), (4, 200)]], ids=["q1", "spec"]
)
def test_split_kv(num_segments: int, requests: list[tuple[int, int]]) -> None:
    """Split-KV partials merged by the reduce kernel; short sequences leave segments empty.
    Spec slices prefer the interpreter's 3 tiles: a 204-key request takes 5 slices."""
    run_and_check(cpu_batch(requests, num_padded_requests=1, num_padding_tokens=2),
                  num_segments=num_segments)  # fmt: skip


@pytest.mark.parametrize(
    "features",
    [
        dict(sliding_window=7),
        dict(sliding_window=40),
        dict(softcap=2.0),
        dict(causal=False),
    ],
    ids=["window7", "window40", "softcap", "noncausal"],
)
@pytest.mark.parametrize("num_segments", [1, 4], ids=["nosplit", "split4"])
def test_score_features(features: dict, num_segments: int) -> None:
    requests = MIXED if num_segments == 1 else DECODES
    run_and_check(cpu_batch(requests), num_segments=num_segments, **features)


@pytest.mark.parametrize("num_segments", [1, 4], ids=["nosplit", "split4"])
def test_alibi_and_sinks(num_segments: int) -> None:
    requests = MIXED if num_segments == 1 else DECODES
    gen = torch.Generator().manual_seed(1)
    alibi = (torch.rand(8, generator=gen) * 0.5).to(DEVICE)
    sinks = (torch.randn(8, generator=gen) * 2).to(DEVICE)
    run_and_check(cpu_batch(requests), num_segments=num_segments, alibi_slopes=alibi)
    run_and_check(cpu_batch(requests), num_segments=num_segments, sinks=sinks)


@pytest.mark.parametrize("num_segments", [1, 8], ids=["nosplit", "split8"])
def test_window_of_one(num_segments: int) -> None:
    """Each query sees only its own key; with 8 segments most segments are fully masked and
    must contribute nothing (m = -inf, l = 0) rather than NaN."""
    run_and_check(cpu_batch([(4, 0), (1, 9), (2, 40)]), num_segments=num_segments,
                  sliding_window=1)  # fmt: skip


@pytest.mark.parametrize("fp8", FP8_TYPES.values(), ids=FP8_TYPES.keys())
@pytest.mark.parametrize("provider", ["unified", "grouped"])
@pytest.mark.parametrize("num_segments", [1, 4], ids=["nosplit", "split4"])
def test_fp8_cache(fp8: torch.dtype, provider: str, num_segments: int) -> None:
    """An fp8 cache read back as cache * scale; the conversion follows the cache's type."""
    requests = MIXED if num_segments == 1 else DECODES
    batch = cpu_batch(requests, num_padding_tokens=2)
    run_and_check(batch, provider=provider, num_segments=num_segments, fp8=fp8)


def test_extreme_logits_stay_finite() -> None:
    batch = cpu_batch(MIXED)
    batch.query.mul_(60)  # fp16 scores in the thousands: overflow if not max-subtracted
    run_and_check(batch)


def test_cache_write_matches_scatter() -> None:
    batch = cpu_batch(MIXED, num_padding_tokens=4)
    expected_k, expected_v = batch.key_cache.clone(), batch.value_cache.clone()
    write_kv_cache(batch.key, batch.value, batch.key_cache, batch.value_cache,
                   batch.slot_mapping)  # fmt: skip
    got_k, got_v = batch.key_cache.clone(), batch.value_cache.clone()
    batch.key_cache.copy_(expected_k)
    batch.value_cache.copy_(expected_v)
    scatter_new_tokens(batch)
    assert torch.equal(got_k, batch.key_cache)
    assert torch.equal(got_v, batch.value_cache)


@pytest.mark.parametrize("fp8", FP8_TYPES.values(), ids=FP8_TYPES.keys())
def test_cache_write_fp8(fp8: torch.dtype) -> None:
    """An fp8 cache stores x / scale in the cache's own fp8 type, bit for bit.

    The new K/V are fp8 values times their scale, so storing them needs no rounding: Triton
    3.6's interpreter rounds fp32 -> fp8 wrongly when rounding up crosses a power of two.
    """
    batch = fp8_batch(cpu_batch(MIXED, num_padding_tokens=4), fp8, 0.5, 0.25, exact=True)
    want_k, want_v = fp8_written_caches(batch, 0.5, 0.25)
    key_cache, value_cache = batch.key_cache, batch.value_cache
    k_scale, v_scale = torch.tensor(0.5, device=DEVICE), torch.tensor(0.25, device=DEVICE)
    write_kv_cache(batch.key, batch.value, key_cache, value_cache, batch.slot_mapping, k_scale,
                   v_scale)  # fmt: skip
    assert torch.equal(key_cache.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(value_cache.view(torch.uint8), want_v.view(torch.uint8))


def test_choose_num_segments() -> None:
    assert choose_num_segments(1, 1, 1, 8, 132) == 32
    assert choose_num_segments(4, 4, 1, 8, 132) == 32
    assert choose_num_segments(8, 8, 1, 8, 132) == 16
    assert choose_num_segments(64, 64, 1, 8, 132) == 1  # enough programs already
    assert choose_num_segments(MAX_SPLIT_TOKENS + 1, 2, 1, 8, 132) == 1  # past the workspace
    assert choose_num_segments(8, 2, 100, 8, 132) == 1  # prefill-shaped batch


def test_fill_segments() -> None:
    """Slices per sequence that fill the waves asked for (two unless told), a power of two
    within the grid's segments."""
    assert configs.fill_segments(64, 16, 132) == 4  # 8 requests x 8 KV heads: 264 // 64
    assert configs.fill_segments(64, 16, 132, waves=4) == 8  # 528 // 64
    assert configs.fill_segments(8, 32, 132) == 32  # 1 request: every slice of the grid
    assert configs.fill_segments(256, 4, 132) == 1  # 32 requests fill two waves unsplit
    assert configs.fill_segments(3, 8, 132) == 8
    assert configs.fill_segments(1, 1, 1) == 1


def test_narrow_split_grids_have_under_one_pair_per_12_sms() -> None:
    """On 132 SMs one request at 8 KV heads makes a narrow grid, two a wide one; on 114 (H100
    PCIe) too. An unsplit step is never narrow."""
    for num_sms in (132, 114):
        assert configs.is_narrow_split(8, num_sms)
        assert not configs.is_narrow_split(16, num_sms)
    assert configs.choose_split(1, 1, 1, 8, 132) == (32, True)
    assert configs.choose_split(2, 2, 1, 8, 132) == (32, False)
    assert configs.choose_split(4, 1, 4, 8, 132) == (32, True)  # one spec-verify request
    assert configs.choose_split(9, 1, 9, 8, 132) == (1, False)  # prefill-shaped


@pytest.mark.parametrize(
    ("max_query_len", "shape", "tile_n", "segment_tiles", "fill_waves"),
    [
        (1, "decode_split", 64, 16, 4),
        (1, "decode_split_narrow", 128, 2, 2),
        (4, "spec_split", 64, 16, 2),  # 16 rows at 4 query heads per KV head
        (8, "spec_split", 128, 32, 2),  # 32 rows: the spec_split_tall row
        (4, "spec_split_narrow", 128, 16, 2),
    ],
)
def test_hopper_split_rows(
    max_query_len: int,
    shape: str,
    tile_n: int,
    segment_tiles: int,
    fill_waves: int,
    table: pytest.MonkeyPatch,
) -> None:
    """Hopper's split rows (H200): 64-key tiles where the grid is wide and a request's rows fit
    16, 128-key tiles for narrow grids and 32-row blocks; the slice lengths and waves of each."""
    table.setattr(configs, "_arch", lambda: "hopper")
    cfg = configs.attention_config(128, 4, max_query_len, shape)
    assert (cfg.tile_n, cfg.segment_tiles, cfg.fill_waves) == (tile_n, segment_tiles, fill_waves)


@pytest.mark.parametrize(
    ("max_query_len", "num_segments", "dense", "narrow", "shape"),
    [
        (1, 1, False, False, "decode"),
        (1, 1, False, True, "decode"),  # narrowness applies to split grids only
        (1, 8, False, False, "decode_split"),
        (1, 8, False, True, "decode_split_narrow"),
        (4, 1, False, False, "spec"),
        (4, 8, False, False, "spec_split"),
        (4, 8, False, True, "spec_split_narrow"),
        (9, 1, False, False, "prefill"),
        (9, 1, True, False, "prefill_dense"),
    ],
)
def test_launch_shape_names_each_table_row(
    max_query_len: int, num_segments: int, dense: bool, narrow: bool, shape: str
) -> None:
    assert configs.launch_shape(max_query_len, num_segments, dense, narrow) == shape
    assert shape in configs.SHAPES


@pytest.mark.parametrize("provider", ["unified", "grouped"])
@pytest.mark.parametrize(("narrow_split", "warps"), [(False, 4), (True, 2)])
def test_narrow_split_launches_read_the_narrow_row(
    provider: str,
    narrow_split: bool,
    warps: int,
    table: pytest.MonkeyPatch,
    spy: Callable[[object, str], list[dict]],
) -> None:
    """A split launch told its grid is narrow reads the decode_split_narrow row (2 warps here,
    so it shows); the outputs stay right either way."""
    narrow_row = (configs.config_table_name(), "decode_split_narrow")
    table.setitem(configs._TABLE, narrow_row, (16, 16, 2, 1))
    calls = spy(unified if provider == "unified" else grouped, "launch_attention")
    batch = cpu_batch(DECODES[:3])
    run_and_check(batch, provider=provider, num_segments=4, narrow_split=narrow_split)
    split = [c["config"] for c in calls if c.get("num_segments", 1) > 1]
    assert split and all(cfg.num_warps == warps for cfg in split)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """`monkeypatch` for tests that patch the launch table: attention_config's cache is emptied
    before and after, so no config built from a patched row reaches another test."""
    configs.attention_config.cache_clear()
    yield monkeypatch
    configs.attention_config.cache_clear()


@pytest.mark.parametrize(("max_query_len", "warps"), [(2, 8), (4, 8), (8, 4)])
def test_tall_unsplit_spec_tiles_take_fewer_warps_on_hopper(
    max_query_len: int, warps: int, table: pytest.MonkeyPatch
) -> None:
    """Hopper's spec row has 8 warps for 16 rows; a q8 tile at 4 query heads per KV head (32
    rows) reads the spec_tall row, 4 warps (H200: 288 vs 457 us); split tiles keep their own
    row."""
    table.setattr(configs, "_arch", lambda: "hopper")
    unsplit = configs.attention_config(128, 4, max_query_len, "spec")
    split = configs.attention_config(128, 4, max_query_len, "spec_split")
    assert (unsplit.block_m, unsplit.num_warps) == (max(16, 4 * max_query_len), warps)
    assert (split.num_warps, split.num_stages) == (4, 2)


def test_fp8_kv_keeps_the_spill_free_hopper_rows(table: pytest.MonkeyPatch) -> None:
    """fp8 K/V dequantises each tile in registers: on sm_90 the two-stage decode tile and a
    four-warp 32-row spec tile spill with it (compile_check), so fp8 keeps three stages and
    eight warps; 16-bit caches get the faster rows."""
    table.setattr(configs, "_arch", lambda: "hopper")
    decode = [configs.attention_config(128, 4, 1, "decode", kv_fp8=f) for f in (False, True)]
    spec = [configs.attention_config(128, 4, 8, "spec", kv_fp8=f) for f in (False, True)]
    assert [c.num_stages for c in decode] == [2, 3]
    assert [c.num_warps for c in spec] == [4, 8]


@pytest.mark.parametrize("provider", ["unified", "grouped"])
def test_fp8_decode_launches_read_the_fp8_row(
    provider: str, table: pytest.MonkeyPatch, spy: Callable[[object, str], list[dict]]
) -> None:
    """Both launchers tell the table that the cache is fp8 (a distinct fp8 row shows it)."""
    table.setitem(configs._FP8_KV_ROWS, (configs.config_table_name(), "decode"), (16, 16, 2, 1))
    calls = spy(unified if provider == "unified" else grouped, "launch_attention")
    batch = cpu_batch([(1, 40), (1, 70), (1, 9)])
    run_and_check(batch, provider=provider, fp8=FP8_TYPES["fp8_e4m3"])
    # The unified launch, or the grouped decode group's (a capture's grids launch every group).
    decode = [c["config"] for c in calls if c.get("group", GROUP_DECODE) == GROUP_DECODE]
    assert decode and all(cfg.num_warps == 2 for cfg in decode)


@pytest.mark.parametrize("provider", ["unified", "grouped"])
def test_tall_spec_verify_launches_with_the_spec_tall_row(
    provider: str, table: pytest.MonkeyPatch, spy: Callable[[object, str], list[dict]]
) -> None:
    """An unsplit step whose verify queries (8 tokens x 4 heads per KV head) outgrow the spec
    row's 16 rows launches with the spec_tall row, so a sweep can tune it on its own."""
    table.setitem(configs._TABLE, (configs.config_table_name(), "spec_tall"), (16, 16, 2, 1))
    calls = spy(unified if provider == "unified" else grouped, "launch_attention")
    run_and_check(cpu_batch([(8, 40), (1, 70), (5, 9)]), provider=provider)
    decode = [c["config"] for c in calls if c.get("group", GROUP_DECODE) == GROUP_DECODE]
    assert decode and all(cfg.num_warps == 2 and cfg.block_m == 32 for cfg in decode)


@pytest.mark.parametrize("provider", ["unified", "grouped"])
def test_split_spec_verify_launches_with_its_own_row(
    provider: str, table: pytest.MonkeyPatch, spy: Callable[[object, str], list[dict]]
) -> None:
    """A split spec-verify step reads the spec_split row (on Hopper two stages, where unsplit
    spec tiles keep three); the outputs stay right with it."""
    # A row no other shape has (2 warps), so each launch shows which row it read.
    table.setitem(configs._TABLE, (configs.config_table_name(), "spec_split"), (16, 16, 2, 2))
    calls = spy(unified if provider == "unified" else grouped, "launch_attention")
    run_and_check(cpu_batch([(3, 40), (1, 70), (4, 9)]), provider=provider, num_segments=4)
    split = [c["config"] for c in calls if c.get("num_segments", 1) > 1]
    assert split and all(cfg.num_warps == 2 and cfg.num_stages == 2 for cfg in split)


def test_launcher_rejects_bad_input() -> None:
    batch = cpu_batch([(1, 3)])
    out = torch.empty_like(batch.query)
    common = (batch.query_start_loc, batch.seq_lens, batch.block_table)
    kw = dict(max_query_len=1, max_seq_len=4, softmax_scale=1.0)
    with pytest.raises(ValueError, match="needs a SplitKVWorkspace"):
        unified_attention(batch.query, batch.key_cache, batch.value_cache, out, *common,
                          num_segments=4, **kw)  # fmt: skip
    with pytest.raises(ValueError, match="not one of"):
        unified_attention(batch.query.to(torch.int8), batch.key_cache, batch.value_cache, out,
                          *common, **kw)  # fmt: skip


# --------------------------------------------------------------------- GPU, at real sizes

GPU_MIXED = [(1, 4000), (1, 37), (300, 2000), (1000, 0), (17, 0), (1, 1), (129, 513)]


def gpu_batch(requests: list[tuple[int, int]], **overrides: object) -> PagedBatch:
    kwargs = dict(
        num_heads=32, num_kv_heads=8, head_size=128, page_size=16, dtype=torch.bfloat16,
        device="cuda",
    )  # fmt: skip
    kwargs.update(overrides)
    return make_batch(requests, **kwargs)


# Each case compiles its own specialisations (a few seconds each), so the matrix is a cross,
# not a full product: every dtype, page size and head grouping appears at least once.
GPU_MATRIX = [
    (torch.bfloat16, 16, (32, 8)),
    (torch.bfloat16, 32, (64, 8)),
    (torch.bfloat16, 64, (16, 1)),
    (torch.bfloat16, 128, (28, 4)),
    (torch.float16, 16, (28, 4)),
    (torch.float32, 16, (32, 8)),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "page_size", "heads"),
    GPU_MATRIX,
    ids=[f"{str(d)[6:]}-page{p}-{h[0]}q{h[1]}kv" for d, p, h in GPU_MATRIX],
)
def test_gpu_mixed_batch(dtype: torch.dtype, page_size: int, heads: tuple[int, int]) -> None:
    batch = gpu_batch(
        GPU_MIXED, num_heads=heads[0], num_kv_heads=heads[1], page_size=page_size, dtype=dtype,
        num_padded_requests=3, num_padding_tokens=5,
    )  # fmt: skip
    run_and_check(batch)


@pytest.mark.gpu
@pytest.mark.parametrize("head_size", [64, 80, 96, 112, 128, 192, 256])
def test_gpu_head_sizes(head_size: int) -> None:
    run_and_check(gpu_batch([(1, 900), (200, 300), (700, 0)], head_size=head_size))


@pytest.mark.gpu
@pytest.mark.parametrize("num_segments", [2, 8, 32])
@pytest.mark.parametrize(
    "requests",
    [[(1, 16000), (1, 3000), (1, 5)], [(4, 8000), (4, 20), (8, 3000), (2, 1)]],
    ids=["q1", "spec"],
)
def test_gpu_split_kv(num_segments: int, requests: list[tuple[int, int]]) -> None:
    run_and_check(gpu_batch(requests, num_padded_requests=2, num_padding_tokens=3),
                  num_segments=num_segments)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "features",
    [
        dict(sliding_window=256),
        dict(softcap=30.0),
        dict(alibi_slopes="random"),
        dict(sinks="random"),
        dict(fp8=torch.float8_e4m3fn),
        dict(fp8=torch.float8_e5m2),
        dict(causal=False),
    ],
    ids=["window", "softcap", "alibi", "sinks", "fp8", "fp8_e5m2", "noncausal"],
)
@pytest.mark.parametrize("num_segments", [1, 8], ids=["nosplit", "split8"])
def test_gpu_features(features: dict, num_segments: int) -> None:
    requests = GPU_MIXED if num_segments == 1 else [(1, 5000), (1, 300), (3, 700)]
    batch = gpu_batch(requests)
    gen = torch.Generator().manual_seed(3)
    for name in ("alibi_slopes", "sinks"):
        if features.get(name) == "random":
            features = dict(features, **{name: (torch.rand(32, generator=gen) * 0.1).cuda()})
    run_and_check(batch, num_segments=num_segments, **features)


@pytest.mark.gpu
def test_gpu_block_ids_need_int64() -> None:
    """Pages far into a >4 GiB cache: page * stride overflows int32 if offsets are 32-bit."""
    spare = (2**31) // (16 * 8 * 256) + 64  # elements per page: 16 slots x 8 heads x 2 x 128
    batch = gpu_batch([(1, 70), (40, 30)], spare_blocks=spare)
    # Move every page id to the top of the pool, where the byte offset passes 2**31 elements.
    num_blocks = batch.key_cache.shape[0]
    used = batch.block_table[batch.block_table > 0].unique()
    top = torch.arange(num_blocks - len(used), num_blocks, device="cuda", dtype=torch.int32)
    remap = torch.zeros(num_blocks, dtype=torch.int32, device="cuda")
    remap[used.long()] = top
    batch.key_cache[top.long()] = batch.key_cache[used.long()]
    batch.value_cache[top.long()] = batch.value_cache[used.long()]
    batch.block_table = remap[batch.block_table.long()]
    run_and_check(batch)
    run_and_check(batch, num_segments=4)
