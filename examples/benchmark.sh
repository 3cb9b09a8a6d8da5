#!/usr/bin/env bash
# Kernel benchmark on the performance.md baseline shapes: ours vs FA3 and vLLM's Triton kernel.
# Rows are appended to results.jsonl; extra arguments go to bench.py (see its --help).
exec python3 "$(dirname "$0")/../benchmarks/bench.py" kernels --providers portable,triton_attn,fa3 --cases baseline --out results.jsonl "$@"
