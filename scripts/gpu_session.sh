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
# KERNEL_CASES, BUDGET, COMMIT) before the steps run; COMMIT=<sha> stamps result rows when the
# tree arrived without .git.
#
# Everything goes to $OUT (the device tool brings back at most 8 files): session.log (full
# output of every step), results.jsonl (all JSON result rows), summary.txt (the table printed at
# the end), kernels_vs_fa3.png (if matplotlib is there).
#
# Steps                    vLLM  limit  least  what
#   pytest_kernels          no    300     60   tests/test_kernels.py tests/test_grouped.py (no vLLM)
#   bench_kernels_ours      no    200     60   bench.py kernels: ours only, $KERNEL_CASES
#   bench_kernels_ours_cg   no    200     60   the same, baseline cases, do_bench_cudagraph
#   bench_kernels_sweep     no    300     90   bench.py kernels: ours only, all cases
#   pytest_vllm             yes   200     40   tests/test_backend.py tests/test_registration.py
#   pytest_all              yes   480     90   the whole of tests/
#   e2e_correctness         yes   390    150   e2e_check.py correctness: CUSTOM vs TRITON_ATTN, FLASH_ATTN
#   e2e_correctness_grouped yes   300    150   --route grouped, against TRITON_ATTN only (fits one call)
#   bench_kernels           yes   240     90   bench.py kernels: portable, triton_attn, fa3; $KERNEL_CASES
#   bench_kernels_all       yes   560    120   the same over all cases
#   bench_kernels_cg        yes   240     90   baseline cases timed with do_bench_cudagraph
#   e2e_serve               yes   330    200   e2e_check.py serve: 8B shape, compile + CUDA graphs
#   bench_e2e_quick         yes   560    200   bench.py e2e --quick (short, long) for $E2E_BACKENDS
#   bench_e2e               yes   570    240   bench.py e2e, $E2E_WORKLOADS for $E2E_BACKENDS
#   plot                    no     60      5   plot.py results.jsonl (run last whenever results exist)
#   none                                       run nothing (only set the kit up)
# "limit" is the step's time limit (s), cut to what is left of BUDGET; a step with less than
# "least" seconds left is skipped rather than started. Defaults: p1 = pytest_kernels
# bench_kernels_ours; p2 = bench_kernels_sweep; p3 = pytest_vllm e2e_correctness bench_kernels
# e2e_serve bench_e2e_quick; post = bench_e2e. The final table lists each step's status and the
# key numbers of its SUMMARY line (or pytest's counts).

set -o pipefail
export PYTHONUNBUFFERED=1

PART=${1:-}
case "$PART" in
  p1 | p2 | p3 | post) shift ;;
  *)
    sed -n '2,45p' "$0"
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
E2E_WORKLOADS=short,long
KERNEL_CASES=baseline,smoke
ROUTE=

STEPS=()
for arg in "$@"; do
  case "$arg" in
    BUDGET=* | E2E_BACKENDS=* | E2E_WORKLOADS=* | KERNEL_CASES=* | ROUTE=*) eval "${arg%%=*}=\${arg#*=}" ;;
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
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo "${PORTABLE_ATTN_GIT_COMMIT:-unknown (no .git; pass COMMIT=sha)}")"

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
    pytest_kernels) echo "0|300|60|$PT tests/test_kernels.py tests/test_grouped.py" ;;
    pytest_vllm)
      local files
      files=""
      for f in tests/test_backend.py tests/test_registration.py; do [ -f "$f" ] && files="$files $f"; done
      if [ -n "$files" ]; then echo "1|200|40|$PT $files"; else echo "1|10|1|echo 'no vLLM test files yet'; exit 5"; fi
      ;;
    pytest_all) echo "1|480|90|$PT tests/" ;;
    bench_kernels_ours) echo "0|200|60|$B kernels --providers portable,portable_grouped --cases $KERNEL_CASES --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels_ours_cg) echo "0|200|60|$B kernels --providers portable,portable_grouped --cases baseline --cudagraph --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels_sweep) echo "0|300|90|$B kernels --providers portable,portable_grouped --cases all --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels) echo "1|240|90|$B kernels --providers portable,portable_grouped,triton_attn,fa3 --cases $KERNEL_CASES --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels_all) echo "1|560|120|$B kernels --providers portable,portable_grouped,triton_attn,fa3 --cases all --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    bench_kernels_cg) echo "1|240|90|$B kernels --providers portable,portable_grouped,triton_attn,fa3 --cases baseline --cudagraph --max-seconds \$((STEP_T - 40)) --out $RESULTS" ;;
    e2e_correctness) echo "1|390|150|$E correctness $route_arg --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
    e2e_correctness_grouped) echo "1|300|150|$E correctness --route grouped --backends CUSTOM,TRITON_ATTN --total-timeout \$((STEP_T - 15)) --out $RESULTS" ;;
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
