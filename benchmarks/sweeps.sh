#!/usr/bin/env bash
# Config sweeps of our kernels alone (no vLLM needed), for choosing the rows of the per-arch
# table in vllm_portable_attn/kernels/configs.py offline. Each variant is one bench.py process
# (the table is read at launch), timed with the plain do_bench timer; rows go to $RESULTS.
#
#   bash benchmarks/sweeps.sh SWEEP [SWEEP ...]
#
# Sweeps:
#   decode_split   split-KV decode tiles and segment counts on the small-batch long-context
#                  cases (goal K2)
#   prefill_dense  the grouped route's dense prefill tiles (goal K4)
#   prefill_paged  the paged prefill/extend tiles (goals K4, K5)
#   page_order     shuffled vs consecutive block ids: what the page scatter costs
#   spec           spec-verify tiles: the tall unsplit tile (q8 at GQA 4) and the split one
#                  (goal K3; q8 was the shape under 0.90x FA3 in session I)
#   slices         the key tiles a split-KV slice prefers and the waves its slices fill
#                  (configs._SPLIT_SLICES): decode on small batches of 1k-32k keys, and the
#                  16-row and tall spec-verify rows
#   split_rows     the split rows of 33412ce against the rows before it (128-key tiles,
#                  2-tile decode slices) on every decode and spec-verify case, and the narrow
#                  rows against the wide ones on the one- and two-request cases
#   spec_blocks    q8 at GQA 4 (32 rows) cut into two 16-row blocks per request (K/V read
#                  twice, L2 permitting once), through --configs
#   lookahead      page lookahead (`SHAPE_lookahead=1`) for the spec-verify and decode rows,
#                  with tiles whose pipeline then holds two or three K/V buffers
#   ncu            Nsight Compute sections for the paged and the dense prefill (one launch each)
# Correctness is not re-checked here (no reference, no FA3): the tests cover every config.

set -o pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/sweeps_out}
RESULTS=${RESULTS:-$OUT/results.jsonl}
mkdir -p "$OUT"
BENCH=(python3 benchmarks/bench.py kernels --no-reference --no-ceilings --rep 60 --out "$RESULTS")

K2_CASES=decode_b1_ctx32k,decode_b4_ctx32k,decode_b8_ctx16k,decode_b2_ctx64k,decode_b4_ctx128k,decode_b8_ctx64k
PREFILL_CASES=prefill_b1_8k,prefill_b4_4k,prefill_b16_1k,mixed_2p2k_32d1k
PAGED_CASES=prefill_b1_8k,extend_b4_q512_ctx8k,mixed_2p2k_32d1k
TALL_SPEC_CASES=spec_q8_b32_ctx8k,spec_q8_b32_ctx32k
SPLIT_SPEC_CASES=spec_q8_b8_ctx32k,spec_q4_b8_ctx32k,spec_q2_b8_ctx32k,spec_q8_b1_ctx32k
SLICE_DECODE_CASES=decode_b8_ctx1k,decode_b8_ctx2k,decode_b16_ctx1k,decode_b16_ctx4k,decode_b8_ctx16k
SLICE_DECODE_CASES+=,decode_b4_ctx32k,decode_b32_ctx2k,decode_b2_ctx16k,decode_b16_ctx16k
SLICE_SPEC_CASES=spec_q8_b8_ctx8k,spec_q4_b8_ctx8k,spec_q8_b8_ctx32k,spec_q4_b8_ctx64k,spec_q8_b1_ctx8k
SLICE_SPEC_CASES+=,spec_q8_b8_ctx64k,spec_q2_b32_ctx32k
NARROW_CASES=decode_b1_ctx8k,decode_b1_ctx32k,decode_b1_ctx128k,decode_b2_ctx4k,decode_b2_ctx16k
NARROW_CASES+=,decode_b2_ctx64k,spec_q2_b1_ctx32k,spec_q4_b1_ctx8k,spec_q4_b1_ctx32k
Q8_CASES=spec_q8_b1_ctx8k,spec_q8_b1_ctx32k,spec_q8_b8_ctx8k,spec_q8_b8_ctx32k,spec_q8_b8_ctx64k
Q8_CASES+=,spec_q8_b32_ctx8k,spec_q8_b32_ctx32k
SPEC_CASES=$Q8_CASES,spec_q4_b1_ctx32k,spec_q4_b8_ctx8k,spec_q4_b8_ctx32k,spec_q4_b32_ctx8k
SPEC_CASES+=,spec_q4_b32_ctx32k,spec_q2_b8_ctx32k,spec_q2_b32_ctx8k
DECODE_CASES=decode_b1_ctx32k,decode_b8_ctx16k,decode_b16_ctx4k,decode_b32_ctx2k
DECODE_CASES+=,decode_b64_ctx8k,decode_b128_ctx2k

sweep_decode_split() {
  local tile segs
  for tile in 16x128x4x3 16x64x4x3 16x64x4x4 16x128x4x2 16x32x4x4 16x64x8x3; do
    "${BENCH[@]}" --providers portable --cases "$K2_CASES" --table "decode_split=$tile"
  done
  for segs in 16 32 64; do
    for tile in 16x128x4x3 16x64x4x3; do
      "${BENCH[@]}" --providers portable --cases "$K2_CASES" --table "decode_split=$tile" \
        --segments "$segs"
    done
  done
}

sweep_prefill_dense() {
  local tile
  for tile in 128x64x8x3 128x128x8x2 128x128x8x3 128x64x8x4 64x64x4x3 128x32x8x4; do
    "${BENCH[@]}" --providers portable_grouped --cases "$PREFILL_CASES" \
      --table "prefill_dense=$tile"
  done
}

sweep_prefill_paged() {
  local tile
  for tile in 128x128x8x2 128x64x8x3 128x128x8x3 128x64x8x4 64x128x4x3 128x32x8x4; do
    "${BENCH[@]}" --providers portable --cases "$PAGED_CASES" --table "prefill=$tile"
  done
}

sweep_page_order() {
  local order
  for order in shuffled contiguous; do
    "${BENCH[@]}" --providers portable,portable_grouped --cases "$PAGED_CASES" \
      --page-order "$order"
  done
}

sweep_spec() {
  local tile
  # 64-row tiles (q8 x 4 heads padded to 64) would let Hopper use its 64-row warp-group MMA,
  # which a 32-row tile cannot; half their rows are masked. 64 x 128 keys on four warps spills
  # (sm_90 compile check), so 128-key ones get eight.
  for tile in 16x128x4x3 16x128x4x2 16x64x4x3 64x64x4x3 64x128x8x3 64x128x8x2; do
    "${BENCH[@]}" --providers portable --cases "$TALL_SPEC_CASES" --table "spec_tall=$tile"
  done
  for tile in 16x128x4x2 16x64x4x2 64x64x4x2 64x128x8x2; do
    "${BENCH[@]}" --providers portable --cases "$SPLIT_SPEC_CASES" --table "spec_split=$tile"
  done
}

sweep_slices() {
  local slice
  # The wide decode row (8 tiles over 4 waves): B16 x 4k and B32 x 2k at 0.90x FA3 run 8-wave
  # grids of 8-tile slices; 16 tiles halves them (the row's default since 94ce22b).
  for slice in 8x4 16x4 8x2 16x2; do
    "${BENCH[@]}" --providers portable --cases "$SLICE_DECODE_CASES" --cudagraph \
      --table "decode_split_slice=$slice"
  done
  # The 64-key spec row (16-row blocks) and the 128-key tall row (q8): at 9b5a473, 32-tile
  # slices of the 128-key row ran q8 B8 x 32k 3% faster than 16 (296.1 vs 306.0 us).
  for slice in 16 32; do
    "${BENCH[@]}" --providers portable --cases "$SLICE_SPEC_CASES" --cudagraph \
      --table "spec_split_slice=$slice,spec_split_tall_slice=$slice"
  done
}

sweep_split_rows() {
  local old=decode_split=16x128x4x2,decode_split_slice=2x2,spec_split=16x128x4x2
  local as_wide=decode_split_narrow=16x64x4x2,decode_split_narrow_slice=8x4
  as_wide+=,spec_split_narrow=16x64x4x2
  "${BENCH[@]}" --providers portable --cases decode,spec --cudagraph
  "${BENCH[@]}" --providers portable --cases decode,spec --cudagraph --table "$old"
  "${BENCH[@]}" --providers portable --cases "$NARROW_CASES" --cudagraph --table "$as_wide"
}

sweep_spec_blocks() {
  "${BENCH[@]}" --providers portable --cases "$Q8_CASES" --cudagraph \
    --configs 16x64x4x2,16x128x4x2,16x64x4x3
}

sweep_lookahead() {
  # Without the lookahead the sm_90 pipeliner keeps one K/V buffer per program and waits for
  # each tile at the top of the iteration that reads it (configs.uses_page_lookahead); with it
  # and three stages, two buffers: one tile loads while the other is used.
  local spec=spec_lookahead=1,spec_tall_lookahead=1,spec_split_lookahead=1
  spec+=,spec_split_tall_lookahead=1,spec_split_narrow_lookahead=1
  local split3=spec_split=16x64x4x3,spec_split_tall=16x128x4x3,spec_split_narrow=16x128x4x3
  local keys64=spec=16x64x8x3,spec_tall=16x64x4x3,spec_split=16x64x4x4
  keys64+=,spec_split_tall=16x64x4x3,spec_split_narrow=16x64x4x3
  local variant
  for variant in "" "$spec" "$spec,$split3" "$spec,$keys64"; do
    "${BENCH[@]}" --providers portable --cases "$SPEC_CASES" --cudagraph ${variant:+--table "$variant"}
  done
  local decode=decode=16x64x4x3,decode_lookahead=1,decode_split=16x64x4x3
  decode+=,decode_split_lookahead=1,decode_split_narrow=16x128x4x3,decode_split_narrow_lookahead=1
  for variant in "" "$decode"; do
    "${BENCH[@]}" --providers portable --cases "$DECODE_CASES" --cudagraph ${variant:+--table "$variant"}
  done
}

sweep_ncu() {
  local provider
  for provider in portable portable_grouped; do
    # The grouped route launches one kernel per group; the prefill group's comes third.
    ncu --kernel-name regex:attention_kernel --launch-count 3 --section SpeedOfLight \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
      python3 benchmarks/bench.py kernels --check-only --no-reference --no-ceilings \
      --providers "$provider" --cases prefill_b1_8k >"$OUT/ncu_$provider.txt" 2>&1
    echo "ncu $provider: exit $? ($(wc -l <"$OUT/ncu_$provider.txt") lines)"
  done
}

for sweep in "$@"; do
  echo "=== sweep $sweep ==="
  "sweep_$sweep" || echo "sweep $sweep failed"
done
