#!/usr/bin/env python3
"""Offline inference with the portable Triton attention backend.

    pip install -e .            # registers the backend with vLLM (entry point)
    python3 examples/offline_inference.py --model meta-llama/Llama-3.1-8B-Instruct
    python3 examples/offline_inference.py --model /path/to/model --route grouped \\
        --prompt "The capital of France is"

``attention_backend="CUSTOM"`` selects our backend; the package's ``vllm.general_plugins`` entry
point registers it under that name in every vLLM process. ``--route`` sets
``PORTABLE_ATTN_ROUTE`` (auto, unified or grouped), which the engine processes inherit.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_PROMPTS = [
    "The capital of France is",
    "In one sentence, attention in a transformer is",
    "def fibonacci(n):",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model id or local folder (with tokenizer)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--route", choices=["auto", "unified", "grouped"], default=None)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-mem", type=float, default=0.9, help="gpu_memory_utilization")
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile/CUDA graphs")
    args = ap.parse_args()

    if args.route:
        # Before vLLM starts its engine processes, which read it.
        os.environ["PORTABLE_ATTN_ROUTE"] = args.route

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        attention_backend="CUSTOM",
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_mem,
        enforce_eager=args.enforce_eager,
    )
    prompts = args.prompt or DEFAULT_PROMPTS
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    for out in llm.generate(prompts, params):
        print(f"--- {out.prompt!r}")
        print(out.outputs[0].text)


if __name__ == "__main__":
    main()
