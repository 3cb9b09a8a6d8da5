"""Launch configurations, chosen offline and looked up per call: never autotuned while serving.

Everything here is plain data plus small pure functions, so the choice is cheap (cached),
deterministic, and depends only on quantities that stay fixed for one CUDA-graph capture:
the head geometry, the dtype, the device architecture and its SM count, whether the batch holds
any query longer than the spec-verify bound, and the padded token / request counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

# Split-KV (flash-decoding) is used only for batches of at most this many query tokens: the
# workspace holding the per-segment partial results is sized for it, and beyond it the batch
# already fills the GPU without splitting.
MAX_SPLIT_TOKENS = 64
# The Triton release (major, minor) whose compiler the tables below were measured and
# spill-checked with (the GPU host's). Another release allocates registers differently: Triton
# 3.8 (vLLM 0.33) spills a few words on some rows; compile_check reports that, not fatal.
TUNED_TRITON = (3, 6)
# Upper bound on KV segments per sequence; a power of two so the reduce loads one vector.
MAX_SEGMENTS = 32
# Fewest key tiles per split-KV segment: a sequence too short to give every segment this many
# uses fewer segments (H200, 8 sequences x 1k keys, 128-key tiles: 2-tile slices 21 us, 1-tile
# 24 us, the 16-way split the policy asks for 30 us).
MIN_SEGMENT_TILES = 2
# Waves of programs a split-KV grid fills before its slices get shorter than the table's
# preferred slice length (`AttentionConfig.segment_tiles`, `fill_segments`); `_SPLIT_SLICES`
# sets other counts per row.
FILL_WAVES = 2
# A split-KV grid with fewer (request, KV head) pairs than one per this many SMs is narrow and
# reads the *_split_narrow rows. H200 (132 SMs), 8 KV heads: one request (8 pairs, one per 16.5
# SMs) ran faster on the narrow rows, two (one per 8.3 SMs) on the wide ones; 12 lies between.
_SMS_PER_NARROW_PAIR = 12
# Queries up to this length (decodes and speculative-decoding verify steps) use decode-shaped
# tiles; longer ones use prefill-shaped tiles.
MAX_DECODE_QUERY_LEN = 8


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch parameters of one attention launch.

    block_q: query tokens per program; block_m = block_q * padded query heads per KV head.
    tile_n: keys per inner-loop step, independent of the KV-cache page size.
    page_lookahead: look up the next key tile's pages while this one loads (pipelined prefill).
    keys_as_rows: load K tiles as [keys, head dims], V's layout (see `loads_keys_as_rows`).
    segment_tiles: split-KV only: the key tiles a slice prefers to hold, fewer only where the
        sequence would otherwise leave the grid short of `fill_segments` slices.
    fill_waves: split-KV only: the waves of programs those slices fill (`fill_segments`).
    """

    block_q: int
    block_m: int
    tile_n: int
    num_warps: int
    num_stages: int
    page_lookahead: bool = False
    keys_as_rows: bool = False
    segment_tiles: int = MIN_SEGMENT_TILES
    fill_waves: int = FILL_WAVES


def _arch() -> str:
    """A short architecture tag for the table lookup: 'interpreter', 'hopper', 'ampere', 'cdna'."""
    if not torch.cuda.is_available():
        return "interpreter"
    if torch.version.hip is not None:
        return "cdna"
    major, _ = torch.cuda.get_device_capability()
    return "hopper" if major >= 9 else "ampere"


def config_table_name() -> str:
    """Which architecture's rows of the table this process launches with (read-only)."""
    return _arch()


# The launch shapes, each with its own table row:
#   decode               q_len 1, one program per (request, KV head) over all its keys
#   decode_split         q_len 1 with split-KV: each program covers a slice of the keys
#   decode_split_narrow  the same over a narrow grid (`is_narrow_split`: few requests)
#   spec                 queries of 2..MAX_DECODE_QUERY_LEN tokens (spec-verify), one block each
#   spec_tall            unsplit spec-verify blocks with more rows (query tokens x query heads
#                        per KV head) than the spec row's, e.g. q8 at 4 heads per KV head: 32
#                        rows; `attention_config` picks it from the geometry
#   spec_split           spec-verify with split-KV
#   spec_split_tall      split blocks taller than the spec_split row's (as spec_tall)
#   spec_split_narrow    split spec-verify over a narrow grid, any height
#   prefill              long queries over paged keys (prefills and extends of the unified
#                        route, extends of the grouped route)
#   prefill_dense        fresh prefills over the new tokens' contiguous K/V (grouped route)
# The shapes whose block holds every query of a request (at most MAX_DECODE_QUERY_LEN).
DECODE_SHAPES = (
    "decode",
    "decode_split",
    "decode_split_narrow",
    "spec",
    "spec_tall",
    "spec_split",
    "spec_split_tall",
    "spec_split_narrow",
)
SHAPES = (*DECODE_SHAPES, "prefill", "prefill_dense")
# Shapes `attention_config` swaps for a taller variant when a request's rows outgrow them.
_TALL_SHAPES = {"spec": "spec_tall", "spec_split": "spec_split_tall"}

# (arch, shape) -> (rows per program, keys per tile, warps, stages). "rows" counts query rows
# after GQA packing (tokens x heads), which is what the tensor-core dot sees. Hopper rows come
# from the config sweep in benchmarks/NOTES.md (H200, Llama-8B heads); Ampere and CDNA rows are
# portable starting points, not yet measured on hardware.
_TABLE: dict[tuple[str, str], tuple[int, int, int, int]] = {
    # Small tiles keep the interpreter fast and make tiles smaller than a page (16) likely,
    # so CPU tests cover both tile < page and tile > page.
    ("interpreter", "decode"): (16, 16, 4, 1),
    ("interpreter", "decode_split"): (16, 16, 4, 1),
    ("interpreter", "decode_split_narrow"): (16, 16, 4, 1),
    ("interpreter", "spec"): (16, 16, 4, 1),
    ("interpreter", "spec_tall"): (16, 16, 4, 1),
    ("interpreter", "spec_split"): (16, 16, 4, 1),
    ("interpreter", "spec_split_tall"): (16, 16, 4, 1),
    ("interpreter", "spec_split_narrow"): (16, 16, 4, 1),
    # Two "stages" (meaningless to the interpreter) so that CPU tests run the paged prefill
    # loop with its page lookahead, as Hopper does; decode rows cover the plain lookup.
    ("interpreter", "prefill"): (32, 32, 4, 2),
    ("interpreter", "prefill_dense"): (32, 16, 4, 1),
    # Decode is bandwidth-bound: a modest row count (one token x the GQA group). The unsplit
    # decode tile: two stages ran 2-6% faster than three from B=64 up (B64 x 8k 496.6 vs 512.5
    # us) and the same below (H200, 2026-11-30, every decode case of bench.py).
    ("hopper", "decode"): (16, 64, 4, 2),
    # Split decode, wide grids (two or more requests at 8 KV heads): 64-key tiles (on sm_90
    # 38 KiB of shared memory against 72 KiB: more programs per SM) in slices of 8 tiles
    # over four waves (now up to 16: `_SPLIT_SLICES`) beat 128-key tiles in 2-tile slices by
    # 5-19% (H200, CUDA graphs: B8 x 1k 19.0 vs 20.7 us, B8 x 2k 27.5 vs 32.8, B16 x 1k 28.0
    # vs 33.5, B4 x 8k 42.7 vs 53.0, B8 x 16k 137.8 vs 145.9, B32 x 2k 80.9 vs 89.3; FA3 18.7
    # / 26.9 / 26.4 / 41.8 / 133.5 / 73.3); two requests 6-18% at 1k-128k keys (B2 x 16k 42.8 vs
    # 50.9, x 64k 132.7 vs 162.3; FA3 41.7 / 133.6). One request (a narrow grid) lost 4-35%
    # with them (B1 x 32k 52.5 vs 43.5, x 128k 184 vs 136.5), so it keeps 128-key tiles
    # (likely: with few programs per SM, a wider step keeps more bytes in flight). Two stages,
    # four warps (2026-11-29).
    ("hopper", "decode_split"): (16, 64, 4, 2),
    ("hopper", "decode_split_narrow"): (16, 128, 4, 2),
    # Spec-verify: three stages pay only unsplit (B32 x 8k at q4: 261.7 vs 267.6 us with two).
    # Unsplit, the 16-row tile keeps eight warps (q4 B32 x 8k 254 vs 291 us on four), a 32-row
    # one runs best on four (q8: 288 vs 457 us; FA3 250); 64-row tiles (Hopper's warp-group MMA
    # size, half masked at q8) were slower: 324 us on 64 x 64 x 4 warps, 472 on 64 x 128 x 8.
    ("hopper", "spec"): (16, 128, 8, 3),
    ("hopper", "spec_tall"): (16, 128, 4, 3),
    # Split, two stages were 25-31% faster on every shape measured (q2-8, B1-8 over 8k-64k
    # keys; e.g. q4 B8 x 32k 283 vs 405 us), and four warps 4-7% faster than eight. The 16-row
    # tile (q2, q4 at GQA 4) runs 4-7% faster on 64-key tiles (q4 B8 x 8k 77.4 vs 83.2 us, B8 x
    # 32k 261.8 vs 274.3, q2 B8 x 32k 258.8 vs 269.7; FA3 73.1 / 255.8 / 258.3); the 32-row
    # one (q8) 25% slower (B8 x 8k 107.9 vs 86.1), and 64-row tiles slower still, so tall split
    # blocks and narrow grids keep 128-key tiles. H200, 2026-11-30.
    ("hopper", "spec_split"): (16, 64, 4, 2),
    ("hopper", "spec_split_tall"): (16, 128, 4, 2),
    ("hopper", "spec_split_narrow"): (16, 128, 4, 2),
    ("ampere", "decode"): (16, 64, 4, 2),
    ("ampere", "decode_split"): (16, 64, 4, 2),
    ("ampere", "decode_split_narrow"): (16, 64, 4, 2),
    ("ampere", "spec"): (16, 64, 2, 1),
    ("ampere", "spec_tall"): (16, 64, 2, 1),
    ("ampere", "spec_split"): (16, 64, 2, 1),
    ("ampere", "spec_split_tall"): (16, 64, 2, 1),
    ("ampere", "spec_split_narrow"): (16, 64, 2, 1),
    ("cdna", "decode"): (16, 64, 4, 1),
    ("cdna", "decode_split"): (16, 64, 4, 1),
    ("cdna", "decode_split_narrow"): (16, 64, 4, 1),
    ("cdna", "spec"): (16, 64, 4, 1),
    ("cdna", "spec_tall"): (16, 64, 4, 1),
    ("cdna", "spec_split"): (16, 64, 4, 1),
    ("cdna", "spec_split_tall"): (16, 64, 4, 1),
    ("cdna", "spec_split_narrow"): (16, 64, 4, 1),
    # Prefill is compute-bound: 128 query rows share each K/V tile. Three stages pay once the
    # paged loop looks its pages up a tile ahead (page_lookahead; 2026-11-22 sweep). 128x128x3
    # was 4-6% faster still on long prefills but spills a register (compile_check), so not it.
    ("hopper", "prefill"): (128, 64, 8, 3),
    ("hopper", "prefill_dense"): (128, 64, 8, 3),
    # Ampere: two pipeline stages spill with ALiBi, windows or heads > 128 (compile_check).
    ("ampere", "prefill"): (128, 64, 8, 1),
    ("ampere", "prefill_dense"): (128, 64, 8, 1),
    ("cdna", "prefill"): (128, 64, 8, 1),
    ("cdna", "prefill_dense"): (128, 64, 8, 1),
}


# The TMA prefill (tma_prefill.py) per architecture: (rows, keys, warps, stages) and the fewest
# work items (the prefill group's query blocks x query heads, from its host-known token count)
# that take it. Only sm_90 has a row: its tile is what Triton 3.6 warp-specialises there (4
# warps become 12, 2 stages: 208 KiB of shared memory; 128x64 tiles were 4-5% slower; three
# stages gave NaN outputs). With the persistent grid it beat the portable dense prefill at every
# size measured (H200, Llama-8B heads, CUDA graphs: 1 x 1k 36 vs 50 us, 1 x 2k 92 vs 123, 8k
# 1121 vs 1296); the minimum is the smallest of those, 256 items (1k tokens at 32 heads), since
# smaller ones were not measured and a unified-route step below it is not worth classifying.
# The interpreter row, with no minimum, lets CPU tests run it on every eligible prefill group.
_TMA_PREFILL: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "hopper": ((128, 128, 4, 2), 256),
    "interpreter": ((16, 16, 4, 1), 0),
}
# Head sizes the TMA prefill was compiled and checked for (it holds 208 KiB at 128).
TMA_PREFILL_HEAD_SIZES = (32, 64, 128)


def tma_prefill_config(num_tokens: int, num_heads: int) -> AttentionConfig | None:
    """The TMA prefill's tile for a prefill group of `num_tokens` tokens, or None where it does
    not pay (too few programs) or does not exist (no row for this architecture, or not sm_90:
    the tile and Triton's warp specialisation were measured there only).

    Callers check the rest of its scope: causal, no score modifiers, an unquantised dense K/V
    of a TMA_PREFILL_HEAD_SIZES head size and 16-bit dtype (`tma_prefill_fits`).
    """
    min_tokens = tma_prefill_min_tokens(num_heads)
    if min_tokens is None or num_tokens < max(min_tokens, 1):  # an empty group: no launch
        return None
    rows, tile_n, num_warps, num_stages = _TMA_PREFILL[_arch()][0]
    return AttentionConfig(rows, rows, tile_n, num_warps, num_stages)


def tma_prefill_min_tokens(num_heads: int) -> int | None:
    """Fewest prefill tokens that take the TMA prefill here; None where it does not exist."""
    arch = _arch()
    if arch not in _TMA_PREFILL or (arch == "hopper" and not _is_sm90()):
        return None
    (rows, *_), min_programs = _TMA_PREFILL[arch]
    return rows * triton.cdiv(min_programs, num_heads)


def _is_sm90() -> bool:
    """Hopper proper: compute capability 9.x (the 'hopper' rows also serve newer NVIDIA GPUs).
    Without a GPU (compile_check models an sm_90 target), the table row decides."""
    if not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability()[0] == 9


def launch_shape(
    max_query_len: int, num_segments: int = 1, dense: bool = False, narrow: bool = False
) -> str:
    """The table row for a launch: from host-side counts that are fixed per CUDA graph.
    `narrow`: a split grid with few (request, KV head) pairs (`is_narrow_split`)."""
    if max_query_len > MAX_DECODE_QUERY_LEN:
        return "prefill_dense" if dense else "prefill"
    shape = "spec" if max_query_len > 1 else "decode"
    if num_segments > 1:
        shape += "_split_narrow" if narrow else "_split"
    return shape


def is_narrow_split(programs_per_segment: int, num_sms: int) -> bool:
    """Whether a split-KV grid of `programs_per_segment` (request, KV head) pairs per slice
    is narrow: fewer than one pair per _SMS_PER_NARROW_PAIR SMs (see the *_split_narrow rows)."""
    return programs_per_segment * _SMS_PER_NARROW_PAIR < num_sms


# Rows for fp8 K/V caches where the 16-bit row spills: each K/V tile is dequantised in
# registers, and the two-stage decode tile then spills 16 bytes on sm_90, as does the four-warp
# tall spec tile (compile_check, Triton 3.6). Those launches keep the previous spill-free rows
# (three stages; the spec row's eight warps), not measured for speed with fp8.
_FP8_KV_ROWS = {("hopper", "decode"): (16, 64, 4, 3), ("hopper", "spec_tall"): (16, 128, 8, 3)}

# Split-KV slices per (arch, shape): (key tiles a slice prefers to hold, waves of programs
# they fill); default (MIN_SEGMENT_TILES, FILL_WAVES). H200, CUDA graphs:
# - spec_split_tall / _narrow (128-key tiles): 8 requests (64 (request, KV head) programs per
#   slice) at 8k keys: four slices of 16 tiles beat the policy's sixteen slices of 4 tiles by
#   24% at q8 (86.5 vs 106.9 us; FA3 72.4); at 32k-64k sixteen 16-tile slices were as fast or
#   3-5% faster than four; one request over 8k keys kept its 32 two-tile slices (20-22 us; 4
#   slices took 51 us), which `fill_segments` preserves. The tall row then took 32-tile slices:
#   q8 B8 x 32k 295.9 vs 306.1 us, B8 x 8k / 64k and B1 x 8k within 0.3% (2026-11-30).
# - spec_split (64-key tiles): the same 1k keys a slice, 16 tiles, were best at q4 B8 x 8k
#   (77.4 us; 8 tiles 84.2, 24 87.1, 32 109.3).
# - decode_split (64-key tiles): the best slice count gave about four waves of programs at
#   every batch of 4-32 requests (B8 x 1k: 2-tile slices 19.0 us, 4-tile 21.8; B8 x 2k: 4
#   tiles 27.5, 8 34.4; B4 x 8k: 8 tiles 42.7, 4 48.9). Up to 16 tiles over four waves gives
#   each of those and shortens the 8-wave grids of 16-32 requests at 2k-4k keys: B16 x 4k
#   74.1 vs 79.2 us with 8 tiles, B32 x 2k 75.9 vs 81.1 (FA3 71.5 / 72.8); seven other cases of
#   1k-32k keys within 0.4% (2026-11-30).
# The interpreter's row is small so that CPU tests cover slices cut short by it.
_SPLIT_SLICES = {
    ("hopper", "decode_split"): (16, 4),
    ("hopper", "spec_split"): (16, FILL_WAVES),
    ("hopper", "spec_split_tall"): (32, FILL_WAVES),
    ("hopper", "spec_split_narrow"): (16, FILL_WAVES),
    ("interpreter", "spec_split"): (3, FILL_WAVES),
}

# Shared memory (LDS on AMD) one program may use, per architecture: H100/H200 227 KiB, A100
# 163 KiB, MI300 64 KiB. The interpreter has no limit; the Hopper figure keeps its tiles honest.
_SHARED_MEMORY_BYTES = {
    "interpreter": 232448,
    "hopper": 232448,
    "ampere": 166912,
    "cdna": 65536,
}
# Keys x head dims of one K (or V) tile above which the scores and accumulator of a prefill
# tile no longer fit the register file without spilling (seen at head size 256 on sm80/sm90).
_MAX_TILE_ELEMENTS = 128 * 128


@functools.lru_cache(maxsize=256)
def attention_config(
    head_size_padded: int,
    queries_per_kv_padded: int,
    max_query_len: int,
    shape: str,
    elem_bytes: int = 2,
    score_features: int = 0,
    kv_fp8: bool = False,
) -> AttentionConfig:
    """The tile configuration of one launch of the attention kernel.

    Any configuration is correct for any batch; `max_query_len` only sizes a spec-verify block
    so one program holds every query of a request (K/V read once). The table's tile is then
    shrunk, if need be, until the pipelined K/V tiles and the Q block fit shared memory for this
    head size and element size (fp32 doubles every tile). `score_features` counts the score
    modifiers in use (softcap, ALiBi, window, sinks); two or more add live registers per score,
    so prefill tiles get fewer keys. `kv_fp8`: the K/V cache is fp8 (dequantised per tile).
    """
    arch = _arch()
    # A decode-shaped block holds every query of a request: its rows are those tokens x heads.
    request_rows = (
        triton.next_power_of_2(min(max(max_query_len, 1), MAX_DECODE_QUERY_LEN))
        * queries_per_kv_padded
    )
    if shape in _TALL_SHAPES and request_rows > _TABLE[(arch, shape)][0]:
        shape = _TALL_SHAPES[shape]
    row = _FP8_KV_ROWS.get((arch, shape)) if kv_fp8 else None
    rows, tile_n, num_warps, num_stages = row or _TABLE[(arch, shape)]
    if shape in DECODE_SHAPES:
        block_m = max(rows, request_rows)
    else:
        block_m = max(rows, queries_per_kv_padded)
        # Large heads double the register footprint of Q and the accumulator.
        if head_size_padded >= 256 and block_m > 64:
            block_m //= 2
        while tile_n > 32 and tile_n * head_size_padded * elem_bytes > 2 * _MAX_TILE_ELEMENTS:
            tile_n //= 2
        if score_features >= 2:
            tile_n = min(tile_n, 64 if arch == "hopper" else 32)
        if elem_bytes == 4:
            # fp32 dots run without tensor cores ("ieee"): a 128-row fp32 tile spills heavily.
            block_m, tile_n = max(16, queries_per_kv_padded), min(tile_n, 16)
            num_warps = 4

    def shared_bytes() -> int:
        kv_tiles = max(num_stages, 1) * 2 * tile_n * head_size_padded * elem_bytes
        return kv_tiles + block_m * head_size_padded * elem_bytes

    while shared_bytes() > _SHARED_MEMORY_BYTES[arch] and tile_n > 16:
        tile_n //= 2
    while shared_bytes() > _SHARED_MEMORY_BYTES[arch] and num_stages > 1:
        num_stages -= 1
    block_q = max(block_m // queries_per_kv_padded, 1)
    segment_tiles, fill_waves = _SPLIT_SLICES.get((arch, shape), (MIN_SEGMENT_TILES, FILL_WAVES))
    return AttentionConfig(
        block_q,
        block_q * queries_per_kv_padded,
        tile_n,
        num_warps,
        num_stages,
        page_lookahead=uses_page_lookahead(shape, num_stages),
        keys_as_rows=loads_keys_as_rows(shape, arch),
        segment_tiles=segment_tiles,
        fill_waves=fill_waves,
    )


# The launch shapes whose paged loop looks its pages up a tile ahead (`uses_page_lookahead`).
_PAGE_LOOKAHEAD_SHAPES = {"prefill"}


def uses_page_lookahead(shape: str, num_stages: int) -> bool:
    """Whether a paged launch looks its pages up a tile ahead (see `_attend_tiles`).

    Without it Triton's pipeliner keeps a single K/V buffer and waits for each tile's copy at
    the top of the iteration that reads it (sm_90 TTGIR), so one program never overlaps its
    own loads with its dots: latency is hidden only by other programs on the SM. Prefill tiles
    gain from it (H200: +20-26%); decode tiles lost 18%. The lookahead feeds the software
    pipeline: a single stage has none, and there it only adds live registers (spills with
    ALiBi on gfx950).
    """
    return shape in _PAGE_LOOKAHEAD_SHAPES and num_stages > 1


def loads_keys_as_rows(shape: str, arch: str) -> bool:
    """Whether K tiles are loaded as [keys, head dims] and read transposed by the dot.

    In V's layout, one page lookup and one mask serve both tiles: on Hopper paged prefill and
    extend ran 5-6% faster and spec-verify 5% (H200), where the dot reads K transposed from
    shared memory. The unsplit decode tile ran 30% slower, so decode tiles keep K as [head dims,
    keys]; so do Ampere (the transpose happens in registers there: the 128-row tile spills) and
    CDNA (not measured). The interpreter follows Hopper, so CPU tests run both layouts.
    """
    return arch in ("hopper", "interpreter") and not shape.startswith("decode")


def count_score_features(*features: object) -> int:
    """How many optional score modifiers are on (each argument: None or falsy when off)."""
    return sum(1 for feature in features if feature is not None and feature is not False)


def choose_num_segments(
    num_tokens: int, num_reqs: int, max_query_len: int, num_kv_heads: int, num_sms: int
) -> int:
    """KV segments per sequence for split-KV decode; 1 means no split.

    Splitting pays when the unsplit grid (about one program per request and KV head) is under
    two waves. A split then aims at four waves: short slices start and finish often, so one
    program's prologue overlaps another's loads (H200 sweep, NOTES.md: 32 rather than 16
    segments at 4 x 32k, 16 rather than 8 at 8 x 16k, 10-15% faster). Only padded counts are
    used, so the answer is fixed for each CUDA-graph size.
    """
    if num_tokens > MAX_SPLIT_TOKENS or max_query_len > MAX_DECODE_QUERY_LEN:
        return 1
    programs = max(num_reqs, 1) * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    return min(MAX_SEGMENTS, triton.next_power_of_2(triton.cdiv(4 * num_sms, programs)))


def choose_split(
    num_tokens: int, num_reqs: int, max_query_len: int, num_kv_heads: int, num_sms: int
) -> tuple[int, bool]:
    """A step's split-KV choice, as the launchers take it (`num_segments`, `narrow_split`): the
    segment count (`choose_num_segments`) and whether that split grid is narrow."""
    num_segments = choose_num_segments(num_tokens, num_reqs, max_query_len, num_kv_heads, num_sms)
    narrow = num_segments > 1 and is_narrow_split(max(num_reqs, 1) * num_kv_heads, num_sms)
    return num_segments, narrow


def fill_segments(
    programs_per_segment: int, num_segments: int, num_sms: int, waves: int = FILL_WAVES
) -> int:
    """The fewest slices a split-KV launch cuts a sequence into where its keys allow (at
    MIN_SEGMENT_TILES tiles each): the power of two that fills `waves` waves of programs,
    given `programs_per_segment` programs (requests x KV heads) per slice index; at most
    `num_segments`. Past that count a slice first grows to the table's `segment_tiles`, and
    only then are more slices cut, up to `num_segments` (the kernel's `tiles_per_segment`).
    """
    fill = max(waves * num_sms // max(programs_per_segment, 1), 1)
    return min(1 << (fill.bit_length() - 1), num_segments)
