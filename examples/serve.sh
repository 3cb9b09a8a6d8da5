#!/usr/bin/env bash
# Serve a model through vLLM's OpenAI-compatible server with the portable Triton backend.
#
#   bash examples/serve.sh MODEL [more `vllm serve` arguments]
#   PORTABLE_ATTN_ROUTE=grouped bash examples/serve.sh meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192
#
# PORTABLE_ATTN_ROUTE picks the kernel route: auto (default), unified or grouped. The project
# must be installed (`pip install -e .`) so vLLM's plugin loader registers the CUSTOM backend.
set -euo pipefail
MODEL=${1:?usage: bash examples/serve.sh MODEL [vllm serve args...]}
shift
export PORTABLE_ATTN_ROUTE=${PORTABLE_ATTN_ROUTE:-auto}
if command -v vllm >/dev/null 2>&1; then
  exec vllm serve "$MODEL" --attention-backend CUSTOM "$@"
fi
# Installs without the console script (e.g. the offline GPU-host kit) have the same CLI here.
exec python3 -c 'from vllm.entrypoints.cli.main import main; main()' serve "$MODEL" --attention-backend CUSTOM "$@"
