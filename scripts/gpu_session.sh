#!/usr/bin/env bash
# The one script to run on the GPU host (see shared/gpu/README.md for the vLLM kit).
#
#   bash scripts/gpu_session.sh PART [STEP ...] [NAME=VALUE ...]
#
# PART says which vLLM kit part came with this upload, and so how vLLM gets set up:
#   p1    .gpu-kit/p1 is in the tree: `source .gpu-kit/p1/setup.sh` (no vLLM yet)
#   p2    .gpu-kit/p2 is in the tree: `source /var/tmp/vllm-kit/p1/setup.sh` (no vLLM yet)
#   p3    .gpu-kit/p3 is in the tree: the same source installs vLLM; then this project
#   post  any later run on the same (still warm) host: vLLM and the project as in p3
# STEPs (default per part, below) run in the order given. Each step has its own time limit,
# trimmed so the whole script ends within BUDGET seconds (default 570: the device tool stops a
# command at 600). A failing step does not stop the next one; a step that no longer fits is
# reported as SKIP. NAME=VALUE arguments set variables (E2E_BACKENDS, E2E_WORKLOADS, ROUTE,
# KERNEL_CASES, CG_CASES, BUDGET, HYP_SEED, SANITIZER_TESTS, COMMIT) before the steps run; COMMIT=<sha>
# stamps result rows when the tree arrived without .git; HYP_SEED=<n> replays pytest_random_gpu's
# examples of an earlier run (its log prints the seed); SANITIZER_TESTS="id id ..." replaces the
# sanitizer's pytest node ids.
#
# Everything goes to $OUT (the device tool brings back at most 8 files): session.log (full
# output of every step), results.jsonl (all JSON result rows), summary.txt (the table printed at
# the end), kernels_vs_fa3.png (if matplotlib is there).
#
# Steps                    vLLM  limit  least  what
#   pytest_kernels          no    420     60   tests/test_kernels.py tests/test_grouped.py (no vLLM)
#   pytest_random_gpu       no    540    180   tests/test_randomized.py's GPU variant (hypothesis, 60
#                                              random batches at real sizes, both routes); fails if
#                                              it was skipped; -s and verbose, so a failing example
#                                              is in the log even if shrinking runs out of time
#   sanitizer               no    240    120   compute-sanitizer memcheck over $SANITIZER_TESTS (16
#                                              kernel tests: both routes, split-KV, paged, fp8,
#                                              window, sinks, head 80, int64 page offsets) with
#                                              PYTORCH_NO_CUDA_MEMORY_CACHING=1; fails on any error
#   bench_kernels_ours      no    200     60   bench.py kernels: ours only, $KERNEL_CASES
#   bench_kernels_ours_cg   no    200     60   the same, baseline cases, do_bench_cudagraph
#   split_probe             no    300     60   benchmarks/split_kv_probe.py: split-KV decode, attention
#                                              vs merge per segment count (CUDA graphs)
#   bench_kernels_sweep     no    300     90   bench.py kernels: ours only, all cases
#   pytest_vllm             yes   200     40   tests/test_backend.py tests/test_registration.py
#   pytest_all              yes   480     90   the whole of tests/
#   e2e_correctness         yes   390    150   e2e_check.py correctness: CUSTOM vs TRITON_ATTN, FLASH_ATTN
#   e2e_correctness_grouped yes   300    150   --route grouped, against TRITON_ATTN only (fits one call)
#   e2e_gemma2              yes   300    150   correctness --model-kind gemma2 (sliding window 100 on
#                                              every other layer, soft caps 50/30, head 256) vs
#                                              TRITON_ATTN; eager (about 2-3 min)
#   e2e_fp8                 yes   450    200   correctness --kv-cache-dtype fp8: CUSTOM vs TRITON_ATTN
#                                              with bf16 queries, decided on teacher-forced scores
#                                              against the fp8 effect (TRITON_ATTN with a bf16 cache);
#                                              CUSTOM bf16 cache and stock TRITON_ATTN (fp8 queries)
#                                              as information; eager, 5 engines (about 5 min)
#   e2e_tp2                 yes   480    240   correctness -tp 2 vs TRITON_ATTN, a PASS/FAIL line per
#                                              worker; eager; SKIP (exit 77) with fewer than 2 GPUs;
#                                              needs the nvidia-h200-x2 kind (a fresh host: p1..p3)
#   bench_kernels           yes   240     90   bench.py kernels: portable, triton_attn, fa3; $KERNEL_CASES
#   bench_kernels_all       yes   560    120   the same over all cases
#   bench_kernels_cg        yes   240     90   $CG_CASES (default baseline) timed with do_bench_cudagraph
#   bench_tma_prefill       yes   300     90   the grouped route with and without the sm_90 TMA prefill,
#                                              against FA3, on the prefill and mixed cases,
#                                              do_bench_cudagraph
#   bench_plan              yes   300     60   bench.py plan: per-step builder / forward overhead (K7)
#   bench_precompile        yes   300    120   bench.py precompile: a layer's precompile with a cold
#                                              Triton cache, one thread and the backend's own count
#   e2e_serve               yes   330    200   e2e_check.py serve: 8B shape, compile + CUDA graphs
#   bench_e2e_quick         yes   560    200   bench.py e2e --quick (short, long) for $E2E_BACKENDS
#   bench_e2e               yes   570    240   bench.py e2e, $E2E_WORKLOADS for $E2E_BACKENDS
#   plot                    no     60      5   plot.py results.jsonl (run last whenever results exist)
#   none                                       run nothing (only set the kit up)
# "limit" is the step's time limit (s), cut to what is left of BUDGET; a step with less than
# "least" seconds left is skipped rather than started. Defaults: p1 = pytest_kernels
# bench_kernels_ours; p2 = bench_kernels_sweep; p3 = pytest_vllm e2e_correctness bench_kernels
# e2e_serve bench_e2e_quick; post = bench_e2e. The final table lists each step's status and the
# key numbers of its SUMMARY line (or pytest's counts). A step that exits 77 is a SKIP.
#
# e2e_gemma2, e2e_fp8 and e2e_tp2 run eager (no torch.compile, no CUDA graphs) to fit one call:
# the CUDA-graph path of CUSTOM is covered by e2e_serve and e2e_correctness. (fp8 needs eager
# anyway: its deciding reference drops vLLM's fp8 query quantization at run time; TP needs it
# on the lent multi-GPU hosts, where compiled TP graphs could try NVLink multicast.)
#
# hypothesis (pytest_random_gpu, pytest_all) may be missing on the GPU host. If so, those steps
# install its wheels from .whl/ (ignored by git; carry it with the call) into
# /var/tmp/portable_attn_pydeps, which lasts while the host stays up. Fetch them where pip works:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#         hypothesis==6.155.2 sortedcontainers==2.4.0

set -o pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the lent multi-GPU hosts (it can take the shared GPUs out of
# service); harmless on one GPU. Every child process inherits these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

PART=${1:-}
case "$PART" in
  p1 | p2 | p3 | post) shift ;;
  *)
    awk 'NR > 1 && /^set -o pipefail/ { exit } NR > 1' "$0"
    echo "usage: bash scripts/gpu_session.sh p1|p2|p3|post [STEP ...] [NAME=VALUE ...]" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
START=$(date +%s)
OUT=${OUT:-/tmp/gpu_session_out} # the device tool sets OUT; elsewhere keep the tree clean
mkdir -p "$OUT"
LOG=$OUT/session.log
RESULTS=$OUT/results.jsonl
SUMMARY=$OUT/summary.txt
: >>"$LOG"

BUDGET=570
RESERVE=20 # seconds kept for the plot and the summary
MIN_STEP=40
E2E_BACKENDS=CUSTOM,FLASH_ATTN,TRITON_ATTN
E2E_WORKLOADS=short,long,latency
KERNEL_CASES=baseline,smoke
CG_CASES=baseline
ROUTE=
HYP_SEED=
# Kernel tests under compute-sanitizer, most telling first (a step that runs out of time loses
# the last ones): unified paged mixed batch, grouped route (dense prefill; long prefills through
# the sm_90 TMA prefill), split-KV with 32 segments, fp8 split / grouped, grouped split, head
# size 80 (padded to 128), sliding window on both routes, sinks, the cache write, the classifier (with an empty request), small-size edge
# cases, and int64 page offsets in a >4 GiB cache (a 4 GiB CPU tensor first: about 20 s).
SANITIZER_TESTS="\
tests/test_kernels.py::test_gpu_mixed_batch[bfloat16-page16-32q8kv] \
tests/test_grouped.py::test_gpu_grouped[dtype0-v2] \
tests/test_grouped.py::test_gpu_grouped_large_prefills[dtype0-tma] \
tests/test_kernels.py::test_gpu_split_kv[q1-32] \
tests/test_kernels.py::test_gpu_features[split8-fp8] \
tests/test_grouped.py::test_gpu_grouped_features[fp8] \
tests/test_grouped.py::test_gpu_grouped_split[4] \
tests/test_kernels.py::test_gpu_head_sizes[80] \
tests/test_kernels.py::test_gpu_features[nosplit-window] \
tests/test_grouped.py::test_gpu_grouped_features[window] \
tests/test_kernels.py::test_gpu_features[nosplit-sinks] \
tests/test_kernels.py::test_cache_write_matches_scatter \
tests/test_grouped.py::test_classifier_groups_and_order \
tests/test_kernels.py::test_window_of_one[split8] \
tests/test_grouped.py::test_grouped_matches_reference[random-tma] \
tests/test_kernels.py::test_gpu_block_ids_need_int64"

STEPS=()
for arg in "$@"; do
  case "$arg" in
    BUDGET=* | E2E_BACKENDS=* | E2E_WORKLOADS=* | KERNEL_CASES=* | CG_CASES=* | ROUTE=* | HYP_SEED=* | SANITIZER_TESTS=*)
      eval "${arg%%=*}=\${arg#*=}"
      ;;
    COMMIT=*) export PORTABLE_ATTN_GIT_COMMIT=${arg#*=} ;; # when .git did not travel
    *=*) echo "unknown setting $arg" >&2 ;;
    *) STEPS+=("$arg") ;;
  esac
done
if [ ${#STEPS[@]} -eq 0 ]; then
  case "$PART" in
    p1) STEPS=(pytest_kernels bench_kernels_ours) ;;
    p2) STEPS=(bench_kernels_sweep) ;;
    p3) STEPS=(pytest_vllm e2e_correctness bench_kernels e2e_serve bench_e2e_quick) ;;
    post) STEPS=(bench_e2e) ;;
  esac
fi

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - START)); }

say "=== gpu_session $PART: steps ${STEPS[*]} (budget ${BUDGET}s) at $(date -u +%FT%TZ)"
# COMMIT= wins: the device tool's copy of the tree may carry a stale .git.
say "commit ${PORTABLE_ATTN_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git; pass COMMIT=sha)")}"

# ---------------------------------------------------------------------------------------------
# vLLM kit
# ---------------------------------------------------------------------------------------------
KIT=/var/tmp/vllm-kit
case "$PART" in
  p1)
    if [ -f .gpu-kit/p1/setup.sh ]; then
      # shellcheck disable=SC1091
      source .gpu-kit/p1/setup.sh >>"$LOG" 2>&1
      tail -n 3 "$LOG" | grep -i 'vllm kit' || true
    else
      say "WARNING: .gpu-kit/p1 is not in the tree (carry it with this run)"
    fi
    ;;
  *)
    if [ -f "$KIT/p1/setup.sh" ]; then
      # shellcheck disable=SC1091
      source "$KIT/p1/setup.sh" >>"$LOG" 2>&1
      tail -n 3 "$LOG" | grep -i 'vllm kit' || true
    elif [ -f .gpu-kit/p1/setup.sh ]; then
      # shellcheck disable=SC1091
      source .gpu-kit/p1/setup.sh >>"$LOG" 2>&1
    else
      say "WARNING: $KIT/p1 is missing on this host: it is a fresh machine (the last one was"
      say "         given back). Start again with p1. Steps that need vLLM will be skipped."
    fi
    ;;
esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

HAVE_VLLM=0
if python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)' 2>/dev/null; then
  HAVE_VLLM=1
fi
say "vLLM importable: $([ $HAVE_VLLM = 1 ] && echo yes || echo no)"

# The project: installed so vLLM's general-plugin entry point finds it in every process.
install_project() {
  if python3 -c 'import sys; from importlib.metadata import entry_points as e; sys.exit(not any(x.value == "vllm_portable_attn:register" for x in e(group="vllm.general_plugins")))' 2>/dev/null &&
    python3 -c 'import vllm_portable_attn, sys; sys.exit(not vllm_portable_attn.__file__.startswith(sys.argv[1]))' "$REPO" 2>/dev/null; then
    say "project already installed (editable, this tree)"
    return
  fi
  say "--- installing the project (pip -e, offline)"
  if timeout 240 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1; then
    say "project installed"
  else
    # Fallback: a bare dist-info that declares the same entry point, with the source tree on
    # PYTHONPATH (already there). importlib.metadata finds it like an installed distribution.
    local shim=/var/tmp/portable_attn_ep
    local di=$shim/vllm_portable_attn_entrypoint-0.0.0.dist-info
    mkdir -p "$di"
    printf 'Metadata-Version: 2.1\nName: vllm-portable-attn-entrypoint\nVersion: 0.0.0\n' >"$di/METADATA"
    printf '[vllm.general_plugins]\nportable_attn = vllm_portable_attn:register\n' >"$di/entry_points.txt"
    export PYTHONPATH="$shim:$PYTHONPATH"
    say "WARNING: pip install -e failed (see session.log); using an entry-point shim in $shim"
  fi
  python3 - <<'EOF' 2>&1 | tee -a "$LOG"
from importlib.metadata import entry_points
eps = [f"{e.name} = {e.value}" for e in entry_points(group="vllm.general_plugins")]
print("vllm.general_plugins entry points:", eps or "NONE")
EOF
}
if [ "$HAVE_VLLM" = 1 ] && { [ "$PART" = p3 ] || [ "$PART" = post ]; }; then
  install_project
fi

# Environment record (full in the log, one line on stdout).
{
  echo "--- environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 - <<'EOF' 2>&1
import importlib.metadata as md
import sys
def v(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return None
print("python", sys.version.split()[0], "| torch", v("torch"), "| triton", v("triton"),
      "| vllm", v("vllm"), "| transformers", v("transformers"), "| flashinfer",
      v("flashinfer-python"), "| matplotlib", v("matplotlib"))
EOF
} >>"$LOG"
say "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

# ---------------------------------------------------------------------------------------------
# Step helpers: steps run in `bash -c`, so these are exported (export -f below)
# ---------------------------------------------------------------------------------------------
PYDEPS=/var/tmp/portable_attn_pydeps

# hypothesis for the randomized tests: already importable, or installed earlier on this host in
# $PYDEPS, or installed now (offline) from the wheels in .whl/.
# shellcheck disable=SC2329 # called by name in a step's bash -c
ensure_hypothesis() {
  if python3 -c 'import hypothesis' 2>/dev/null; then
    python3 -c 'import hypothesis; print("hypothesis", hypothesis.__version__, "is installed")'
    return 0
  fi
  if [ ! -d "$PYDEPS/hypothesis" ]; then
    local -a wheels
    wheels=(.whl/hypothesis-*.whl)
    if [ ! -f "${wheels[0]}" ]; then
      echo "ERROR: hypothesis is not installed on this host, and .whl/ with its wheel did not come with the tree."
      echo "       Fetch hypothesis and sortedcontainers into .whl/ and carry it (the header of scripts/gpu_session.sh says how)."
      return 1
    fi
    python3 -c 'import sortedcontainers' 2>/dev/null || wheels+=(.whl/sortedcontainers-*.whl)
    echo "installing ${wheels[*]} into $PYDEPS (offline)"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$PYDEPS" "${wheels[@]}" || return 1
  fi
  export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c 'import hypothesis; print("hypothesis", hypothesis.__version__, "from", hypothesis.__file__)'
}

# The GPU variants of the tests run only where torch sees a GPU (else they are skipped, which
# would pass silently); TRITON_INTERPRET must not be set.
# shellcheck disable=SC2329 # called by name in a step's bash -c
cuda_preflight() {
  unset TRITON_INTERPRET
  python3 -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit("ERROR: torch.cuda.is_available() is False: the GPU tests would only be skipped")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {torch.cuda.device_count()} GPU(s): {p.name}, {p.multi_processor_count} SMs")'
}

# The last pytest result line of a log ("3 passed, 1 failed in 12.3s"), without the ='s (not
# the sanitizer's "ERROR SUMMARY: 0 errors").
# shellcheck disable=SC2329 # called by name in a step's bash -c
pytest_counts() {
  grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$1" | grep -v 'ERROR SUMMARY' | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'
}

# compute-sanitizer memcheck over the kernel tests in $SANITIZER_TESTS. Fails on any error the
# sanitizer reports, on a failing test, or when no ERROR SUMMARY was printed.
# shellcheck disable=SC2329 # called by name in a step's bash -c
run_sanitizer() {
  local cs c collected id rc tmp errors nsum first at counts passed skipped status
  local -a ids present missing opts pair
  cuda_preflight || {
    echo "SUMMARY: sanitizer FAIL: torch sees no GPU"
    return 2
  }
  cs=$(command -v compute-sanitizer || true)
  if [ -z "$cs" ]; then
    for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer \
      /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer; do
      [ -x "$c" ] && cs=$c
    done
  fi
  if [ -z "$cs" ]; then
    echo "SUMMARY: sanitizer FAIL: compute-sanitizer not found (PATH, /usr/local/cuda*/bin, /opt/nvidia)"
    return 2
  fi
  echo "compute-sanitizer: $cs ($("$cs" --version 2>&1 | grep -i -m1 version))"
  # Node ids that no longer exist (tests get renamed) are left out, with a warning.
  if ! collected=$(python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels.py tests/test_grouped.py 2>&1); then
    echo "$collected" | tail -n 30
    echo "SUMMARY: sanitizer FAIL: pytest could not collect tests/test_kernels.py tests/test_grouped.py"
    return 2
  fi
  read -r -a ids <<<"$SANITIZER_TESTS"
  for id in "${ids[@]}"; do
    if grep -qxF -- "$id" <<<"$collected"; then present+=("$id"); else missing+=("$id"); fi
  done
  for id in "${missing[@]}"; do echo "WARNING: no test $id (left out)"; done
  if [ ${#present[@]} -eq 0 ]; then
    echo "SUMMARY: sanitizer FAIL: none of the ${#ids[@]} node ids in SANITIZER_TESTS exists"
    return 2
  fi
  # Options, each kept only if this compute-sanitizer takes it (tried on a program without
  # CUDA, a second each): one process (pytest runs the tests in-process); CUDA API return codes
  # are not errors here (a failed launch fails its test anyway, and libraries probe the API);
  # device backtraces only; padding after every allocation, so that an overrun lands in the
  # padding rather than in a neighbouring allocation.
  # If even the base options fail on /bin/true, trying is no use: take what --help lists.
  tmp=$(mktemp)
  opts=(--tool memcheck --error-exitcode 86)
  local probe=1 help
  if ! "$cs" "${opts[@]}" /bin/true >"$tmp" 2>&1; then
    echo "note: compute-sanitizer on /bin/true failed ($(tail -n 2 "$tmp" | tr '\n' ' ')); options from --help"
    probe=0
    help=$("$cs" --help 2>&1)
  fi
  for c in "--target-processes application-only" "--report-api-errors no" "--show-backtrace device" \
    "--print-limit 40" "--padding 256"; do
    read -r -a pair <<<"$c"
    if [ "$probe" = 0 ]; then
      grep -q -- "${pair[0]}" <<<"$help" && opts+=("${pair[@]}")
    elif "$cs" "${opts[@]}" "${pair[@]}" /bin/true >"$tmp" 2>&1; then
      opts+=("${pair[@]}")
    else
      echo "WARNING: compute-sanitizer does not take $c: $(tail -n 2 "$tmp" | tr '\n' ' ')"
    fi
  done
  echo "+ PYTORCH_NO_CUDA_MEMORY_CACHING=1 $cs ${opts[*]} python3 -m pytest -v -rfEs ... (${#present[@]} tests, limit $((STEP_T - 25))s)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 $((STEP_T - 25)) "$cs" "${opts[@]}" \
    python3 -m pytest -v -rfEs -p no:cacheprovider --durations=20 "${present[@]}" 2>&1 | tee "$tmp"
  rc=${PIPESTATUS[0]}
  errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$tmp" | grep -Eo '[0-9]+' | awk '{ s += $1 } END { print s + 0 }')
  nsum=$(grep -c 'ERROR SUMMARY' "$tmp")
  first=$(grep -E '^========= +(Invalid|Misaligned|Out-of-range|Hardware|Program hit|Malloc|Illegal|Uninitialized|Barrier|Warp|Lane|Cuda|CUDA)' "$tmp" | head -n 1 | sed 's/^=* *//')
  at=$(grep -E '^========= +at ' "$tmp" | head -n 1 | sed 's/^=* *//')
  counts=$(pytest_counts "$tmp")
  passed=$(grep -cE '(^| )PASSED' "$tmp")
  skipped=$(grep -cE '(^| )SKIPPED' "$tmp")
  local refused
  refused=$(grep -m1 -iE 'device not supported|not supported on this (device|platform)|unable to (attach|launch|initialize)' "$tmp")
  rm -f "$tmp"
  local tail_note="${#present[@]} tests (${#missing[@]} missing)"
  if [ -n "$refused" ]; then
    echo "SUMMARY: sanitizer FAIL: compute-sanitizer could not check this GPU ('$refused'; gVisor hosts refuse it, Firecracker ones work); exit $rc; $tail_note"
    return 1
  fi
  if [ "$errors" -gt 0 ]; then
    echo "SUMMARY: sanitizer FAIL: memcheck $errors error(s), first: ${first:-?} ${at}; ${counts:-$passed passed}; $tail_note"
    return 1
  fi
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "SUMMARY: sanitizer TIMEOUT: memcheck no error in the $passed tests that passed before the limit; $tail_note"
    return 124
  fi
  if [ "$nsum" = 0 ]; then
    echo "SUMMARY: sanitizer FAIL: no ERROR SUMMARY line (exit $rc; the sanitizer did not finish?); ${counts:-no pytest result}; $tail_note"
    return 1
  fi
  if [ "$rc" != 0 ] || [ "$skipped" != 0 ]; then
    status="FAIL"
    [ "$rc" = 0 ] && rc=1 # a skipped test checked nothing
    echo "SUMMARY: sanitizer $status: memcheck 0 errors, but pytest: ${counts:-exit $rc}; $tail_note"
    return "$rc"
  fi
  echo "SUMMARY: sanitizer PASS: memcheck 0 errors; ${counts}; $tail_note"
}

# tests/test_randomized.py's GPU variant (60 hypothesis examples at real sizes), verbose and
# without output capture: every example is logged as it is tried, with the traceback of each
# failing one, so a failure is diagnosable even when shrinking runs out of time.
# shellcheck disable=SC2329 # called by name in a step's bash -c
run_pytest_random_gpu() {
  local node=tests/test_randomized.py::test_gpu_random_batches seed tmp rc tried failing counts first falsifying
  ensure_hypothesis || {
    echo "SUMMARY: pytest_random_gpu FAIL: hypothesis is missing (see above)"
    return 2
  }
  cuda_preflight || {
    echo "SUMMARY: pytest_random_gpu FAIL: torch sees no GPU"
    return 2
  }
  seed=${HYP_SEED:-$((RANDOM * 32768 + RANDOM))}
  echo "hypothesis seed $seed (HYP_SEED=$seed replays these examples)"
  tmp=$(mktemp)
  timeout -k 10 $((STEP_T - 20)) python3 -m pytest -v -s -rfEs -p no:cacheprovider --durations=5 \
    --hypothesis-seed="$seed" --hypothesis-verbosity=verbose --hypothesis-show-statistics "$node" 2>&1 | tee "$tmp"
  rc=${PIPESTATUS[0]}
  # Each example's verbose header: "Trying example:" (hypothesis 6.1xx) or "Test case:" (6.168).
  tried=$(grep -cE 'Trying example|Test case: ' "$tmp")
  failing=$(grep -cE '^E +' "$tmp")
  counts=$(pytest_counts "$tmp")
  first=$(grep -E '^E +' "$tmp" | head -n 2 | sed 's/^E *//' | tr '\n' ' ')
  # Hypothesis' shrunk example, when it got that far: "Falsifying example: test(reqs=..., ...)".
  falsifying=$(awk '/Falsifying example/ { f = 1 } f { print } f && /^(E )? *\)$/ { exit }' "$tmp" | sed 's/^E *//' | tr -s ' \n' ' ' | cut -c1-240)
  rm -f "$tmp"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "SUMMARY: pytest_random_gpu TIMEOUT: $tried examples tried (seed $seed); $([ "$failing" -gt 0 ] && echo "FAILING examples in the log, first: $first" || echo "no failure seen")"
    return 124
  fi
  if [ "$rc" = 0 ] && [[ "$counts" == *"1 passed"* ]]; then
    echo "SUMMARY: pytest_random_gpu PASS: $counts, $tried examples (seed $seed)"
    return 0
  fi
  if [[ "$counts" == *skipped* ]]; then
    echo "SUMMARY: pytest_random_gpu FAIL: the GPU variant was skipped ($counts); nothing was checked"
    return 1
  fi
  echo "SUMMARY: pytest_random_gpu FAIL: ${counts:-exit $rc}, $tried examples (seed $seed); ${falsifying:-no shrunk example}; first error: ${first:-see the log}"
  [ "$rc" = 0 ] && rc=1
  return "$rc"
}
export -f ensure_hypothesis cuda_preflight pytest_counts run_sanitizer run_pytest_random_gpu
export PYDEPS

# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
# STEP_T (the step's time limit) is exported so that commands can hand a slightly smaller limit
# to tools that clean up their own engine processes.
step_spec() { # name -> "needs_vllm|limit|least useful time|command"
  local B="python3 benchmarks/bench.py" E="python3 benchmarks/e2e_check.py"
  local PT="python3 -m pytest -q -rfE -p no:cacheprovider --maxfail=25 --durations=10"
  local route_arg=""
  [ -n "$ROUTE" ] && route_arg="--route $ROUTE"
  case "$1" in
    pytest_kernels) echo "0|420|60|$PT tests/test_kernels.py tests/test_grouped.py" ;;
    pytest_random_gpu) echo "0|540|180|run_pytest_random_gpu" ;;
    sanitizer) echo "0|240|120|run_sanitizer" ;;
    pytest_vllm)
      local files
      files=""
      for f in tests/test_backend.py tests/test_registration.py; do [ -f "$f" ] && files="$files $f"; done
      if [ -n "$files" ]; then echo "1|200|40|$PT $files"; else echo "1|10|1|echo 'no vLLM test files yet'; exit 5"; fi
      ;;
    pytest_all) echo "1|480|90|ensure_hypothesis; $PT tests/" ;;
    bench_kernels_ours) echo "0|200|60|$B kernels --providers portable,portable_grouped --cases $KERNEL_CASES --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels_ours_cg) echo "0|200|60|$B kernels --providers portable,portable_grouped --cases baseline --cudagraph --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    split_probe) echo "0|300|60|python3 benchmarks/split_kv_probe.py --out $RESULTS" ;;
    bench_kernels_sweep) echo "0|300|90|$B kernels --providers portable,portable_grouped --cases all --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels) echo "1|240|90|$B kernels --providers portable,portable_grouped,triton_attn,fa3 --cases $KERNEL_CASES --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels_all) echo "1|560|120|$B kernels --providers portable,portable_grouped,triton_attn,fa3 --cases all --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels_cg) echo "1|240|90|$B kernels --providers portable,portable_grouped,triton_attn,fa3 --cases $CG_CASES --cudagraph --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_tma_prefill) echo "1|300|90|$B kernels --providers portable_grouped,portable_grouped_no_tma,fa3 --cases prefill,mixed --cudagraph --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_plan) echo "1|300|60|$B plan --out $RESULTS" ;;
    bench_precompile) echo "1|300|120|$B precompile --out $RESULTS" ;;
    e2e_correctness) echo "1|390|150|$E correctness $route_arg --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    e2e_correctness_grouped) echo "1|300|150|$E correctness --route grouped --backends CUSTOM,TRITON_ATTN --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    e2e_gemma2) echo "1|300|150|$E correctness --model-kind gemma2 --backends CUSTOM,TRITON_ATTN --enforce-eager $route_arg --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    e2e_fp8) echo "1|450|200|$E correctness --kv-cache-dtype fp8 --backends CUSTOM,TRITON_ATTN --enforce-eager $route_arg --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    e2e_tp2) echo "1|480|240|$E correctness --tensor-parallel-size 2 --backends CUSTOM,TRITON_ATTN --enforce-eager $route_arg --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    e2e_serve) echo "1|330|200|$E serve $route_arg --timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    bench_e2e_quick) echo "1|560|200|$B e2e --quick --backends $E2E_BACKENDS --workloads short,long $route_arg --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    bench_e2e) echo "1|570|240|$B e2e --backends $E2E_BACKENDS --workloads $E2E_WORKLOADS $route_arg --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    plot) echo "0|60|5|python3 benchmarks/plot.py $RESULTS -o $OUT/kernels_vs_fa3.png" ;;
    *) return 1 ;;
  esac
}

NAMES=()
STATUSES=()
TIMES=()
KEYS=()
record() { # name status seconds key
  NAMES+=("$1")
  STATUSES+=("$2")
  TIMES+=("$3")
  KEYS+=("$4")
}

# The tools clean up their own engine processes, and `timeout` ends a step's process group.
# As a last line of defence, GPU processes still alive after a step that are visibly ours (a
# vLLM engine, or a command line naming this repo's benchmarks or pytest) are ended by pid, so
# the next step gets the whole GPU. Anything else is only reported.
reap_gpu_procs() {
  local pids p cmdl
  pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ' | grep -E '^[0-9]+$')
  [ -z "$pids" ] && return
  for p in $pids; do
    [ "$p" = "$$" ] && continue
    [ -r "/proc/$p/cmdline" ] || continue
    cmdl=$(tr '\0' ' ' <"/proc/$p/cmdline")
    case "$cmdl" in
      *VLLM::* | *benchmarks/* | *pytest*)
        say "WARNING: ending leftover GPU process $p: ${cmdl:0:120}"
        kill -TERM "$p" 2>/dev/null
        sleep 3
        kill -KILL "$p" 2>/dev/null
        ;;
      *) say "note: GPU process $p still running: ${cmdl:0:120}" ;;
    esac
  done
}

run_step() {
  local name=$1 spec need limit least cmd left t0 rc status key offset
  if ! spec=$(step_spec "$name"); then
    say "=== $name: unknown step"
    record "$name" "UNKNOWN" 0 ""
    return
  fi
  need=${spec%%|*}
  spec=${spec#*|}
  limit=${spec%%|*}
  spec=${spec#*|}
  least=${spec%%|*}
  cmd=${spec#*|}
  if [ "$need" = 1 ] && [ "$HAVE_VLLM" != 1 ]; then
    say "=== $name: SKIP (needs vLLM; the kit is not complete on this host)"
    record "$name" "SKIP" 0 "needs vLLM"
    return
  fi
  left=$((BUDGET - $(elapsed) - RESERVE))
  [ "$name" = plot ] && left=$((BUDGET - $(elapsed) - 5))
  # A step that cannot finish its useful part in the time left is not started at all.
  [ "$least" -lt "$MIN_STEP" ] && [ "$name" != plot ] && least=$MIN_STEP
  if [ "$left" -lt "$least" ]; then
    say "=== $name: SKIP (${left}s of the budget left; it needs at least ${least}s)"
    record "$name" "SKIP" 0 "no time (${left}s left)"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -lt 5 ] && limit=5
  export STEP_T=$limit
  say "=== $name (limit ${limit}s, at +$(elapsed)s): $cmd"
  offset=$(stat -c %s "$LOG")
  t0=$(date +%s)
  timeout -k 15 "$limit" bash -c "$cmd" >>"$LOG" 2>&1 </dev/null
  rc=$?
  local dt=$(($(date +%s) - t0))
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    77) status=SKIP ;;
    5) status="NO TESTS" ;;
    *) status="FAIL($rc)" ;;
  esac
  # The step's own one-line summary: a tool's "SUMMARY:" line or pytest's final count.
  key=$(tail -c +$((offset + 1)) "$LOG" | grep -E '^SUMMARY:' | tail -n 1 | sed 's/^SUMMARY: *//')
  if [ -z "$key" ]; then
    key=$(tail -c +$((offset + 1)) "$LOG" | grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' | tail -n 1 | sed 's/=//g; s/^ *//')
  fi
  echo "--- $name: $status in ${dt}s (exit $rc); last lines:"
  tail -c +$((offset + 1)) "$LOG" | grep -v -E '^\s*$' | tail -n 12 | cut -c1-220
  echo "$name: $status in ${dt}s" >>"$LOG"
  record "$name" "$status" "$dt" "$key"
  reap_gpu_procs
}

export HYP_SEED SANITIZER_TESTS # read by the exported step helpers
for s in "${STEPS[@]}"; do
  [ "$s" = none ] && continue # `none`: only set the kit up (e.g. a p2 upload)
  run_step "$s"
done
if [ -s "$RESULTS" ] && [[ " ${STEPS[*]} " != *" plot "* ]]; then
  run_step plot
fi

# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
{
  echo
  echo "================ gpu_session $PART summary (total $(elapsed)s) ================"
  printf '%-24s %-9s %6s  %s\n' step status secs key
  for i in "${!NAMES[@]}"; do
    printf '%-24s %-9s %6s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${TIMES[$i]}" "${KEYS[$i]:0:300}"
  done
  echo "files in \$OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ')"
} | tee "$SUMMARY" | tee -a "$LOG"

fails=0
for s in "${STATUSES[@]}"; do
  case "$s" in PASS | SKIP) ;; *) fails=$((fails + 1)) ;; esac
done
exit $((fails > 0 ? 1 : 0))
