#!/usr/bin/env python3
"""End-to-end checks of the CUSTOM backend inside a real vLLM engine.

    python3 benchmarks/e2e_check.py serve        # (a) Llama-3.1-8B shape, dummy weights
    python3 benchmarks/e2e_check.py correctness  # (b) CUSTOM vs TRITON_ATTN / FLASH_ATTN

``serve`` starts ``LLM(attention_backend CUSTOM)`` on the Llama-3.1-8B-shaped config with dummy
weights and vLLM's default torch.compile + CUDA-graph settings, generates for a batch of
mixed-length token-id prompts, and checks that every request got all of its tokens and that the
engine really selected CUSTOM (its log line, and the impl class of the model's attention
layers).

``correctness`` builds a small random Llama with real-scale weights (transformers, seed 0,
std 0.02; the q/k projections are drawn wider, see ``--qk-std``), then runs the same greedy
requests through CUSTOM and each reference backend, one engine per child process, with chunked
prefill (small token budget) and prefix-cache hits (a second round that repeats a shared
prefix). Tokens may differ only where each side's token is in the other's top-k at that
position; after the first such divergence the rest of that sequence is not compared. It also
reports the largest |logprob| difference over matching positions. Exit status 0 = pass.

Each subcommand appends one JSON row to ``--out`` and ends its output with a ``SUMMARY:`` line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (needs the line above; also puts the repo root on sys.path)

THIS = str(Path(__file__).resolve())


# ============================================================================================
# (a) serve
# ============================================================================================


def serve_requests(n: int, max_len: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    """Mixed-length prompts (the shortest and the longest always included) and 32-128 new
    tokens each."""
    rng = random.Random(seed)
    lens = [1, max_len] + [rng.randint(2, max_len - 1) for _ in range(max(n - 2, 0))]
    return [
        ([rng.randint(100, vocab - 100) for _ in range(k)], rng.randint(32, 128)) for k in lens[:n]
    ]


def serve_worker(args: argparse.Namespace) -> int:
    """Child: one engine on the given backend, one batch, results to ``--json-result``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    res: dict[str, Any] = {"ok": False, "backend": args.backend}
    out_path = Path(args.json_result)
    vocab = int(json.loads((Path(args.model) / "config.json").read_text())["vocab_size"])
    reqs = serve_requests(args.num_prompts, args.max_prompt_len, args.seed, vocab)
    llm, engine_info = C.start_dummy_engine(args)
    res.update(engine_info)
    out_path.write_text(json.dumps(res))
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in reqs]
    sps = [
        SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False, temperature=0.0)
        for _, n in reqs
    ]
    t1 = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    res["generate_s"] = time.perf_counter() - t1
    problems = []
    for i, (o, (ids, n)) in enumerate(zip(outs, reqs, strict=True)):
        got = len(o.outputs[0].token_ids)
        if got != n:
            problems.append(f"request {i} (prompt {len(ids)} tokens): {got}/{n} tokens")
    res.update(
        num_prompts=len(reqs),
        prompt_lens=[len(ids) for ids, _ in reqs],
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
        expected_tokens=sum(n for _, n in reqs),
        problems=problems,
        ok=not problems,
    )
    out_path.write_text(json.dumps(res))
    print(
        f"[serve worker] {len(reqs)} requests, {res['output_tokens']} tokens in "
        f"{res['generate_s']:.2f}s; problems: {problems or 'none'}",
        flush=True,
    )
    return 0 if not problems else 1


def run_serve(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="e2e_serve_"))
    res_file = tmp / "serve.json"
    cmd = [
        sys.executable,
        THIS,
        "_serve_worker",
        "--backend",
        args.backend,
        "--model",
        args.model,
        "--num-prompts",
        str(args.num_prompts),
        "--max-prompt-len",
        str(args.max_prompt_len),
        "--max-model-len",
        str(args.max_model_len),
        "--gpu-mem",
        str(args.gpu_mem),
        "--seed",
        str(args.seed),
        "--json-result",
        str(res_file),
    ]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    print(
        f"=== serve check: backend {args.backend}, model {args.model}, "
        f"{'eager' if args.enforce_eager else 'torch.compile + CUDA graphs'}",
        flush=True,
    )
    child = C.run_child(
        cmd,
        env_update=C.child_env(args.backend, args.route),
        timeout_s=args.timeout,
        prefix="[serve] ",
    )
    try:
        res = json.loads(res_file.read_text())
    except (OSError, json.JSONDecodeError):
        res = {"ok": False}
    failures = []
    if child.timed_out:
        failures.append(f"timed out after {args.timeout:.0f}s")
    elif child.rc != 0:
        failures.append(f"worker exit status {child.rc}")
    if not res.get("ok"):
        failures.append("requests incomplete: " + "; ".join(res.get("problems", ["no result"])))
    impls = res.get("impls") or []
    failures += backend_evidence_problems(args.backend, child.backends_logged, impls)
    row = {
        "kind": "e2e_serve",
        "backend": args.backend,
        "route": args.route,
        "model": Path(args.model).name,
        "enforce_eager": args.enforce_eager,
        "ok": not failures,
        "failures": failures,
        "backends_logged": child.backends_logged,
        "impls": impls,
        "engine_start_s": res.get("engine_start_s"),
        "generate_s": res.get("generate_s"),
        "num_prompts": res.get("num_prompts"),
        "output_tokens": res.get("output_tokens"),
        "expected_tokens": res.get("expected_tokens"),
        "prompt_lens": res.get("prompt_lens"),
        "rc": child.rc,
        "wall_s": child.elapsed_s,
    }
    C.append_jsonl(args.out, [C.stamp(row, init_cuda=False)])
    print()
    print(f"backend selected (log): {child.backends_logged or 'not seen'}")
    print(f"attention impls (probe): {impls or 'n/a'}")
    print(
        f"engine start {_s(res.get('engine_start_s'))}, generate {_s(res.get('generate_s'))}, "
        f"{res.get('output_tokens')}/{res.get('expected_tokens')} tokens"
    )
    for f in failures:
        print(f"FAIL: {f}")
    status = "PASS" if not failures else "FAIL"
    print(
        f"SUMMARY: e2e_serve {status}: backend {args.backend}, "
        f"{res.get('num_prompts')} prompts, {res.get('output_tokens')} tokens, start "
        f"{_s(res.get('engine_start_s'))}, generate {_s(res.get('generate_s'))}"
    )
    return 0 if not failures else 1


def backend_evidence_problems(backend: str, logged: list[str], impls: list[str]) -> list[str]:
    """Did the engine really run ``backend``? Evidence: vLLM's "Using ... backend" log line and
    the probe of the attention layers' impl classes. Either one confirming is enough (log
    formats drift); a probe that worked and shows another backend is a failure."""
    probe_ok = bool(impls) and not impls[0].startswith("?")
    problems = []
    if probe_ok and not all(x.startswith(backend + ":") for x in impls):
        problems.append(f"attention layers use {impls}, not {backend}")
    confirmed = backend in logged or (probe_ok and any(x.startswith(backend + ":") for x in impls))
    if not confirmed:
        problems.append(
            f"no evidence the engine used {backend}: log showed {logged or 'no backend line'}, "
            f"probe gave {impls or 'nothing'}"
        )
    return problems


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}s"


# ============================================================================================
# (b) correctness
# ============================================================================================


def build_random_model(out_dir: Path, config_dir: Path, seed: int, qk_std: float) -> None:
    """A small Llama with real-scale random weights, saved in bf16 with save_pretrained.

    transformers' default init draws every linear and embedding from N(0, 0.02) and sets the
    norms to 1. At that scale the q/k dot products are tiny and attention is nearly uniform
    (hundreds of effective keys), so an engine that read the wrong pages would still produce
    almost the same averages. Drawing q_proj/k_proj with ``qk_std`` (default 0.08) makes each
    query attend to about ten keys, so which keys are read matters to the output.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(str(config_dir))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if qk_std > 0 and abs(qk_std - cfg.initializer_range) > 1e-12:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.normal_(0.0, qk_std, generator=gen)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir))


def correctness_prompts(vocab: int, seed: int, max_tokens: int) -> list[list[dict[str, Any]]]:
    """Two rounds of requests, identical for every backend.

    Round 1: lengths around block (16) and chunk (512) boundaries, up to 3000 tokens, so long
    prompts are prefilled in several chunks (extends over their own cached pages), plus one
    prompt that starts with an 800-token shared prefix.
    Round 2, after round 1 has filled the prefix cache: the same prefix with other suffixes, the
    identical prompt again, a half-prefix, a repeated long prompt, and a few fresh prompts.
    max_tokens varies (max, max-8, max-16) so the decode batch shrinks in steps.
    """
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randint(5, vocab - 10) for _ in range(n)]

    prefix = toks(800)
    r1_lens = [1, 2, 3, 15, 16, 17, 31, 100, 255, 511, 512, 513, 700, 1030, 1500, 2047, 3000]
    round1 = [toks(n) for n in r1_lens]
    shared = prefix + toks(37)
    round1.append(shared)
    long_repeat = round1[r1_lens.index(1500)]
    round2 = [
        list(shared),
        prefix + toks(1),
        prefix + toks(20),
        prefix + toks(300),
        prefix + toks(600),
        prefix[:400] + toks(250),
        list(long_repeat),
        toks(5),
        toks(64),
        toks(900),
    ]
    rounds = []
    i = 0
    for rnd in (round1, round2):
        reqs = []
        for ids in rnd:
            reqs.append({"ids": ids, "max_tokens": max(1, max_tokens - 8 * (i % 3))})
            i += 1
        rounds.append(reqs)
    return rounds


def correctness_worker(args: argparse.Namespace) -> int:
    """Child: one engine, both rounds, greedy with top-k logprobs; dump to ``--json-result``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rounds = json.loads(Path(args.prompts).read_text())
    out_path = Path(args.json_result)
    res: dict[str, Any] = {"backend": args.backend, "ok": False, "rounds": []}
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        dtype="bfloat16",
        attention_backend=args.backend,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=64,  # must not exceed the small token budget
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        gpu_memory_utilization=args.gpu_mem,
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    res["engine_start_s"] = time.perf_counter() - t0
    res["impls"] = C.probe_attention_impls(llm)
    for rnd in rounds:
        prompts = [TokensPrompt(prompt_token_ids=r["ids"]) for r in rnd]
        sps = [
            SamplingParams(
                temperature=0.0,
                max_tokens=r["max_tokens"],
                logprobs=args.topk,
                ignore_eos=True,
                detokenize=False,
            )
            for r in rnd
        ]
        outs = llm.generate(prompts, sps, use_tqdm=False)
        dumped = []
        for o in outs:
            c = o.outputs[0]
            top = []
            for pos in c.logprobs or []:
                entries = sorted(
                    ((int(t), float(lp.logprob), lp.rank) for t, lp in (pos or {}).items()),
                    key=lambda e: e[2] if e[2] is not None else 1 << 30,
                )
                top.append(entries)
            dumped.append(
                {
                    "tokens": [int(t) for t in c.token_ids],
                    "top": top,
                    "num_cached_tokens": getattr(o, "num_cached_tokens", None),
                    "finish_reason": c.finish_reason,
                }
            )
        res["rounds"].append(dumped)
    res["ok"] = True
    out_path.write_text(json.dumps(res))
    hits = sum((d["num_cached_tokens"] or 0) for d in res["rounds"][-1])
    print(
        f"[correctness worker {args.backend}] done; round-2 prefix-cache hit tokens: {hits}",
        flush=True,
    )
    return 0


def _topk_set(entries: list[list[Any]], k: int) -> dict[int, float]:
    """Token -> logprob for the entries ranked 1..k (vLLM adds the sampled token, which for
    greedy decoding is rank 1 anyway)."""
    out = {}
    for tid, lp, rank in entries:
        if rank is not None and rank <= k:
            out[tid] = lp
    return out


def _chosen_lp(entries: list[list[Any]], tok: int) -> float | None:
    for tid, lp, _ in entries:
        if tid == tok:
            return lp
    return None


def compare_dumps(a: dict[str, Any], b: dict[str, Any], k: int) -> dict[str, Any]:
    """Compare backend ``a`` (ours) against ``b`` request by request."""
    stats: dict[str, Any] = {
        "sequences": 0,
        "identical": 0,
        "allowed_divergences": 0,
        "bad_divergences": 0,
        "length_mismatches": 0,
        "positions_compared": 0,
        "max_lp_diff": 0.0,
        "sum_lp_diff": 0.0,
        "max_topk_lp_diff": 0.0,
        "bad": [],
    }
    for r, (ra, rb) in enumerate(zip(a["rounds"], b["rounds"], strict=True)):
        for i, (sa, sb) in enumerate(zip(ra, rb, strict=True)):
            stats["sequences"] += 1
            ta, tb = sa["tokens"], sb["tokens"]
            if len(ta) != len(tb):
                stats["length_mismatches"] += 1
            diverged = False
            for j in range(min(len(ta), len(tb))):
                if j >= len(sa["top"]) or j >= len(sb["top"]):
                    break
                top_a, top_b = _topk_set(sa["top"][j], k), _topk_set(sb["top"][j], k)
                if ta[j] == tb[j]:
                    stats["positions_compared"] += 1
                    la, lb = _chosen_lp(sa["top"][j], ta[j]), _chosen_lp(sb["top"][j], tb[j])
                    if la is not None and lb is not None:
                        d = abs(la - lb)
                        stats["sum_lp_diff"] += d
                        stats["max_lp_diff"] = max(stats["max_lp_diff"], d)
                    for t in top_a.keys() & top_b.keys():
                        stats["max_topk_lp_diff"] = max(
                            stats["max_topk_lp_diff"], abs(top_a[t] - top_b[t])
                        )
                    continue
                diverged = True
                if ta[j] in top_b and tb[j] in top_a:
                    stats["allowed_divergences"] += 1
                else:
                    stats["bad_divergences"] += 1
                    stats["bad"].append(
                        f"round {r + 1} request {i} position {j}: {ta[j]} vs {tb[j]} "
                        f"(not in each other's top-{k})"
                    )
                break  # the rest of this sequence depends on a different token
            if not diverged and ta == tb:
                stats["identical"] += 1
    n = stats["positions_compared"]
    stats["mean_lp_diff"] = stats.pop("sum_lp_diff") / n if n else None
    return stats


def run_correctness(args: argparse.Namespace) -> int:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="e2e_correctness_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    t0 = time.monotonic()
    backends = [b.strip().upper() for b in args.backends.split(",") if b.strip()]
    if "CUSTOM" not in backends:
        backends.insert(0, "CUSTOM")
    print(
        f"=== correctness: building random tiny Llama in {model_dir} (qk_std {args.qk_std})",
        flush=True,
    )
    build_random_model(model_dir, Path(args.config), args.seed, args.qk_std)
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    rounds = correctness_prompts(vocab, args.seed, args.max_tokens)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(rounds))
    n_req = sum(len(r) for r in rounds)
    print(
        f"{n_req} requests in {len(rounds)} rounds, prompt lengths "
        f"{sorted({len(r['ids']) for rnd in rounds for r in rnd})}",
        flush=True,
    )

    dumps: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for k, be in enumerate(backends):
        left = args.total_timeout - (time.monotonic() - t0) if args.total_timeout else 1e9
        # Leave each later backend a minute, so one slow engine cannot starve the rest.
        share = min(left, max(left - (len(backends) - k - 1) * 60, 60))
        if left < 45:
            runs[be] = {"ok": False, "error": "skipped: out of time"}
            print(f"=== {be}: skipped, {left:.0f}s left", flush=True)
            continue
        res_file = work / f"{be}.json"
        cmd = [
            sys.executable,
            THIS,
            "_correctness_worker",
            "--backend",
            be,
            "--model",
            str(model_dir),
            "--prompts",
            str(prompts_file),
            "--json-result",
            str(res_file),
            "--topk",
            str(args.topk),
            "--max-model-len",
            str(args.max_model_len),
            "--max-num-batched-tokens",
            str(args.max_num_batched_tokens),
            "--gpu-mem",
            str(args.gpu_mem),
        ]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        print(f"=== {be}", flush=True)
        child = C.run_child(
            cmd,
            env_update=C.child_env(be, args.route),
            timeout_s=min(args.timeout_per_backend, share),
            prefix=f"[{be}] ",
        )
        info: dict[str, Any] = {
            "rc": child.rc,
            "timed_out": child.timed_out,
            "backends_logged": child.backends_logged,
            "wall_s": round(child.elapsed_s, 1),
        }
        try:
            d = json.loads(res_file.read_text())
        except (OSError, json.JSONDecodeError):
            d = {"ok": False}
        info["impls"] = d.get("impls")
        info["engine_start_s"] = d.get("engine_start_s")
        if d.get("ok") and child.rc == 0:
            dumps[be] = d
            info["ok"] = True
            info["prefix_cache_hit_tokens"] = sum(
                (x["num_cached_tokens"] or 0) for rnd in d["rounds"] for x in rnd
            )
        else:
            info["ok"] = False
            info["error"] = (
                ("timed out" if child.timed_out else f"rc={child.rc}")
                + ": "
                + " | ".join(child.tail[-4:])
            )
        info["evidence_problems"] = backend_evidence_problems(
            be, child.backends_logged, info["impls"] or []
        )
        runs[be] = info

    failures: list[str] = []
    comparisons: dict[str, Any] = {}
    if "CUSTOM" not in dumps:
        failures.append(f"CUSTOM did not complete: {runs.get('CUSTOM', {}).get('error')}")
    else:
        failures += ["CUSTOM run: " + p for p in runs["CUSTOM"]["evidence_problems"]]
    refs = [b for b in backends if b != "CUSTOM" and b in dumps]
    if "CUSTOM" in dumps:
        for sa in dumps["CUSTOM"]["rounds"]:
            for i, s in enumerate(sa):
                if len(s["tokens"]) == 0:
                    failures.append(f"CUSTOM request {i} produced no tokens")
        if not refs:
            failures.append("no reference backend completed; nothing to compare against")
        for ref in refs:
            st = compare_dumps(dumps["CUSTOM"], dumps[ref], args.topk)
            comparisons[f"CUSTOM_vs_{ref}"] = st
            if st["bad_divergences"]:
                failures.append(
                    f"vs {ref}: {st['bad_divergences']} bad divergences: "
                    + "; ".join(st["bad"][:3])
                )
            if st["length_mismatches"]:
                failures.append(f"vs {ref}: {st['length_mismatches']} length mismatches")
            if st["max_lp_diff"] > args.max_lp_diff:
                failures.append(
                    f"vs {ref}: max |logprob diff| {st['max_lp_diff']:.3f} > {args.max_lp_diff}"
                )
    # The two references against each other: the noise floor the CUSTOM numbers sit on.
    if len(refs) >= 2:
        comparisons[f"{refs[0]}_vs_{refs[1]}"] = compare_dumps(
            dumps[refs[0]], dumps[refs[1]], args.topk
        )

    print()
    rows = []
    for name, st in comparisons.items():
        rows.append(
            (
                name,
                st["sequences"],
                st["identical"],
                st["allowed_divergences"],
                st["bad_divergences"],
                st["positions_compared"],
                f"{st['max_lp_diff']:.4f}",
                "" if st["mean_lp_diff"] is None else f"{st['mean_lp_diff']:.4f}",
                f"{st['max_topk_lp_diff']:.4f}",
            )
        )
    if rows:
        print(
            C.fmt_table(
                [
                    "pair",
                    "seqs",
                    "identical",
                    "allowed div",
                    "BAD div",
                    "positions",
                    "max |dlp|",
                    "mean |dlp|",
                    "max topk |dlp|",
                ],
                rows,
            )
        )
    for be, info in runs.items():
        print(
            f"{be}: {'ok' if info.get('ok') else 'FAILED'}; logged {info.get('backends_logged')}"
            f"; impls {info.get('impls')}; prefix-cache hit tokens "
            f"{info.get('prefix_cache_hit_tokens')}"
            + (f"; {info['error']}" if info.get("error") else "")
        )
    for f in failures:
        print(f"FAIL: {f}")
    row = {
        "kind": "e2e_correctness",
        "route": args.route,
        "qk_std": args.qk_std,
        "topk": args.topk,
        "max_tokens": args.max_tokens,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enforce_eager": args.enforce_eager,
        "ok": not failures,
        "failures": failures,
        "runs": runs,
        "comparisons": {
            k: {kk: vv for kk, vv in v.items() if kk != "bad"} | {"bad": v["bad"][:5]}
            for k, v in comparisons.items()
        },
    }
    C.append_jsonl(args.out, [C.stamp(row, init_cuda=False)])
    key = []
    for ref in refs:
        st = comparisons.get(f"CUSTOM_vs_{ref}")
        if st:
            key.append(
                f"vs {ref}: {st['identical']}/{st['sequences']} identical, "
                f"{st['allowed_divergences']} allowed div, {st['bad_divergences']} bad, "
                f"max|dlp| {st['max_lp_diff']:.3f}"
            )
    status = "PASS" if not failures else "FAIL"
    print(
        f"SUMMARY: e2e_correctness {status}"
        + (f" (route {args.route})" if args.route else "")
        + ": "
        + ("; ".join(key) if key else "; ".join(failures)[:200])
    )
    return 0 if not failures else 1


# ============================================================================================
# CLI
# ============================================================================================


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{serve,correctness}")

    sp = sub.add_parser("serve", help="(a) CUSTOM on the Llama-3.1-8B shape, dummy weights")
    sp.add_argument("--model", default=str(C.LLAMA_8B_DIR), help="folder with config.json")
    sp.add_argument(
        "--backend",
        default="CUSTOM",
        help="vLLM backend name (CUSTOM; others to check the harness itself)",
    )
    sp.add_argument(
        "--route",
        choices=["unified", "grouped"],
        default=None,
        help="PORTABLE_ATTN_ROUTE for the engine",
    )
    sp.add_argument("--num-prompts", type=int, default=16)
    sp.add_argument("--max-prompt-len", type=int, default=3000)
    sp.add_argument("--max-model-len", type=int, default=4096)
    sp.add_argument("--gpu-mem", type=float, default=0.85)
    sp.add_argument(
        "--enforce-eager",
        action="store_true",
        help="disable torch.compile and CUDA graphs (debugging only)",
    )
    sp.add_argument("--timeout", type=float, default=420, help="seconds for the engine child")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", help="append the JSON result row to this file")

    cp = sub.add_parser("correctness", help="(b) greedy outputs of CUSTOM vs reference backends")
    cp.add_argument(
        "--backends",
        default="CUSTOM,TRITON_ATTN,FLASH_ATTN",
        help="CUSTOM plus the references to compare against",
    )
    cp.add_argument(
        "--route",
        choices=["unified", "grouped"],
        default=None,
        help="PORTABLE_ATTN_ROUTE for the CUSTOM run",
    )
    cp.add_argument(
        "--config",
        default=str(C.TINY_LLAMA_DIR),
        help="folder with the config.json of the random model",
    )
    cp.add_argument(
        "--qk-std",
        type=float,
        default=0.08,
        help="init std of q_proj/k_proj (0.02 = transformers' default everywhere)",
    )
    cp.add_argument("--topk", type=int, default=5)
    cp.add_argument("--max-tokens", type=int, default=32)
    cp.add_argument(
        "--max-lp-diff",
        type=float,
        default=0.5,
        help="fail if |logprob| of a matching token differs more than this",
    )
    cp.add_argument("--max-model-len", type=int, default=4096)
    cp.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="scheduler token budget; small, so long prompts are chunked",
    )
    cp.add_argument("--gpu-mem", type=float, default=0.4)
    cp.add_argument("--enforce-eager", action="store_true")
    cp.add_argument("--timeout-per-backend", type=float, default=300)
    cp.add_argument("--total-timeout", type=float, default=0, help="0: no overall limit")
    cp.add_argument("--work-dir", help="keep the model, prompts and dumps here (default: tmp)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--out", help="append the JSON result row to this file")

    sw = sub.add_parser("_serve_worker")  # internal
    sw.add_argument("--backend", required=True)
    sw.add_argument("--model", required=True)
    sw.add_argument("--num-prompts", type=int, required=True)
    sw.add_argument("--max-prompt-len", type=int, required=True)
    sw.add_argument("--max-model-len", type=int, required=True)
    sw.add_argument("--gpu-mem", type=float, required=True)
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--json-result", required=True)
    sw.add_argument("--enforce-eager", action="store_true")

    cw = sub.add_parser("_correctness_worker")  # internal
    cw.add_argument("--backend", required=True)
    cw.add_argument("--model", required=True)
    cw.add_argument("--prompts", required=True)
    cw.add_argument("--json-result", required=True)
    cw.add_argument("--topk", type=int, default=5)
    cw.add_argument("--max-model-len", type=int, default=4096)
    cw.add_argument("--max-num-batched-tokens", type=int, default=512)
    cw.add_argument("--gpu-mem", type=float, default=0.4)
    cw.add_argument("--enforce-eager", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": run_serve,
        "correctness": run_correctness,
        "_serve_worker": serve_worker,
        "_correctness_worker": correctness_worker,
    }
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
