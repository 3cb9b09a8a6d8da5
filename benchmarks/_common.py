"""Helpers shared by ``bench.py`` and ``e2e_check.py``: run metadata, JSONL output, and child
processes that run one vLLM engine each.

Nothing here imports vLLM, torch or Triton at module level, so ``--help`` and CPU-only syntax
checks work on a machine without them.
"""

from __future__ import annotations

import codecs
import datetime as _dt
import functools
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MODELS_DIR = BENCH_DIR / "models"
LLAMA_8B_DIR = MODELS_DIR / "llama-3.1-8b"
TINY_LLAMA_DIR = MODELS_DIR / "tiny-llama"
TINY_GEMMA2_DIR = MODELS_DIR / "tiny-gemma2"

# vLLM 0.26 logs "Using AttentionBackendEnum.CUSTOM backend." when a backend was asked for
# (platforms/cuda.py) and "Using X attention backend out of potential backends" when it chose one.
BACKEND_LOG_RE = re.compile(
    r"Using (?:AttentionBackendEnum\.)?([A-Z][A-Z0-9_]*) (?:attention )?backend"
)
# vLLM's JIT monitor (vllm/utils/jit_monitor.py), active once the engine's warm-up is over:
# a kernel compiled while serving. It names each kernel once per process.
JIT_MONITOR_RE = re.compile(r"Triton kernel JIT compilation during inference: (\w+)")


def our_kernel_names() -> frozenset[str]:
    """Names of this project's Triton kernels, as vLLM's JIT monitor reports them."""
    from vllm_portable_attn.kernels.compile_only import jit_kernels

    return frozenset(name for _, name, _ in jit_kernels())


# Where the repository root must be importable from (the package may not be pip-installed in
# the kernel-only runs on the GPU host).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def count_label(n: int) -> str:
    """A token count as case names spell it: 8192 -> '8k', 1000 -> '1000'."""
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


class BatchLengths:
    """What follows from a batch's per-request lengths, for the dataclasses that hold them:
    ``q_lens`` (new tokens) and ``seq_lens`` (cached context + new tokens, what vLLM passes as
    ``seq_lens``), in the runner's batch order. The queries are the last ``q_lens`` positions."""

    q_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]

    @property
    def num_reqs(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.q_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens)

    @property
    def kv_tokens(self) -> int:
        return sum(self.seq_lens)

    def num_blocks(self, block_size: int) -> int:
        """KV-cache blocks the batch occupies."""
        return sum(-(-s // block_size) for s in self.seq_lens)

    @property
    def attended_pairs(self) -> int:
        """(query, key) pairs under the causal mask: query i of a sequence with context c
        sees c + i + 1 keys."""
        total = 0
        for q, s in zip(self.q_lens, self.seq_lens, strict=True):
            total += q * (s - q) + q * (q + 1) // 2
        return total


def utc_now() -> str:
    """Timestamp for result rows, ISO 8601 in UTC."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@functools.cache
def git_commit() -> dict[str, Any]:
    """The commit the measured code came from; ``None`` fields where git is unavailable."""
    info: dict[str, Any] = {"git_commit": None, "git_dirty": None}
    stamped = os.environ.get("PORTABLE_ATTN_GIT_COMMIT")
    if stamped:
        # Set by whoever shipped the tree (the GPU host's copy may carry a stale .git).
        info["git_commit"] = stamped
        return info
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        info["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def package_version(name: str) -> str | None:
    """Installed version of a distribution without importing it (vLLM's import is slow)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi_gpu() -> tuple[str | None, str | None]:
    """GPU name and driver from nvidia-smi, which (unlike torch) creates no CUDA context."""
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
        if out:
            name, _, driver = out[0].partition(",")
            return name.strip(), driver.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return None, None


@functools.cache
def run_info(init_cuda: bool = True) -> dict[str, Any]:
    """Fields stamped on every result row: GPU, versions, commit.

    ``init_cuda=False`` is for parents of engine processes: a CUDA context held by the parent
    would take GPU memory that vLLM's memory profiling then counts as used by someone else.
    """
    name, driver = _nvidia_smi_gpu()
    info: dict[str, Any] = {
        "gpu": name,
        "driver": driver,
        "num_sms": None,
        "torch": package_version("torch"),
        "triton": package_version("triton"),
        "vllm": package_version("vllm"),
        "python": sys.version.split()[0],
        "hostname": os.uname().nodename,
    }
    if init_cuda:
        try:
            import torch

            info["torch"] = torch.__version__
            info["cuda"] = torch.version.cuda
            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                info["gpu"] = props.name
                info["num_sms"] = props.multi_processor_count
        except ImportError:
            pass
    info.update(git_commit())
    return info


def stamp(row: dict[str, Any], *, init_cuda: bool = True) -> dict[str, Any]:
    """A result row with the run metadata and a timestamp added (row keys win on clashes)."""
    return {"ts": utc_now(), **run_info(init_cuda), **row}


def append_jsonl(path: str | os.PathLike[str] | None, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a JSON-lines file (created with its folder if missing); no-op for None."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str, sort_keys=False) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; malformed lines (a run killed mid-write) are skipped."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (no dependency on tabulate)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(padded))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


@dataclass
class ChildResult:
    """What a child process did: exit code, whether it was killed for time, and what vLLM
    reported about the attention backend in its log."""

    rc: int
    timed_out: bool
    elapsed_s: float
    backends_logged: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    # Kernels vLLM's JIT monitor saw compile after the engine's warm-up (in any process).
    compiled_while_serving: list[str] = field(default_factory=list)


# Process groups of running children: if this process is told to stop (the GPU session script's
# `timeout` sends SIGTERM), it takes them down first, since they live in sessions of their own
# that the signal to our process group does not reach.
_ACTIVE_GROUPS: set[int] = set()
_HANDLER_INSTALLED = False


def _on_term(signum: int, frame: Any) -> None:
    for pgid in list(_ACTIVE_GROUPS):
        _kill_group(pgid, signal.SIGTERM)
    time.sleep(2.0)
    for pgid in list(_ACTIVE_GROUPS):
        _kill_group(pgid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def _install_term_handler() -> None:
    global _HANDLER_INSTALLED
    if not _HANDLER_INSTALLED:
        signal.signal(signal.SIGTERM, _on_term)
        signal.signal(signal.SIGHUP, _on_term)
        _HANDLER_INSTALLED = True


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(
    cmd: Sequence[str],
    *,
    env_update: dict[str, str] | None = None,
    timeout_s: float,
    prefix: str = "",
    tail_lines: int = 40,
) -> ChildResult:
    """Run ``cmd`` in its own session, echo its output line by line, and scan it.

    Why a session of its own: vLLM's engine core and workers are child processes of the child;
    after the child exits (or is killed for time) any of them still alive would keep GPU memory
    that the next engine needs. Killing the child's process group by its id ends exactly those
    and nothing else.
    """
    env = os.environ.copy()
    env["PYTHONUNBUFFERED"] = "1"
    if env_update:
        env.update(env_update)
    t0 = time.monotonic()
    _install_term_handler()
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _ACTIVE_GROUPS.add(proc.pid)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    backends: list[str] = []
    compiled_while_serving: list[str] = []
    tail: list[str] = []
    timed_out = False
    deadline = t0 + timeout_s

    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = ""
    eof = False
    while not eof:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        if not sel.select(timeout=min(remaining, 5.0)):
            continue
        raw = os.read(proc.stdout.fileno(), 65536)
        if not raw:
            eof = True
            chunk = decoder.decode(b"", final=True) + ("\n" if buf else "")
        else:
            chunk = decoder.decode(raw)
        chunk = chunk.replace("\r\n", "\n").replace("\r", "\n")  # progress bars redraw with \r
        buf += chunk
        *lines, buf = buf.split("\n")
        for line in lines:
            print(prefix + line, flush=True)
            m = BACKEND_LOG_RE.search(line)
            if m and m.group(1) not in backends:
                backends.append(m.group(1))
            m = JIT_MONITOR_RE.search(line)
            if m:
                compiled_while_serving.append(m.group(1))
            tail.append(line)
            if len(tail) > tail_lines:
                del tail[0]
    sel.close()
    if timed_out:
        print(
            f"{prefix}[run_child] time limit {timeout_s:.0f}s reached; killing group {proc.pid}",
            flush=True,
        )
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    else:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Engine processes that outlived the child (they share its process group) must go too.
    _kill_group(proc.pid, signal.SIGTERM)
    time.sleep(1.0)
    _kill_group(proc.pid, signal.SIGKILL)
    _ACTIVE_GROUPS.discard(proc.pid)
    rc = proc.returncode if proc.returncode is not None else -1
    return ChildResult(
        rc=124 if timed_out else rc,
        timed_out=timed_out,
        elapsed_s=time.monotonic() - t0,
        backends_logged=backends,
        tail=tail,
        compiled_while_serving=compiled_while_serving,
    )


# --------------------------------------------------------------------------------------------
# Inside an engine: which attention implementation did the model's layers get?
# --------------------------------------------------------------------------------------------


def attention_impls(model: Any) -> list[str]:
    """Run inside a vLLM worker through ``LLM.apply_model``: the distinct
    ``backend name -> impl class`` pairs of the model's attention layers."""
    found: set[str] = set()
    for module in model.modules():
        impl = getattr(module, "impl", None)
        backend = getattr(module, "attn_backend", None)
        if impl is None or backend is None:
            continue
        try:
            name = backend.get_name()
        except Exception:  # noqa: BLE001 - diagnostics only
            name = getattr(backend, "__name__", "?")
        found.add(f"{name}:{type(impl).__module__}.{type(impl).__qualname__}")
    return sorted(found)


def probe_attention_impls(llm: Any) -> list[str]:
    """Best effort: ask every worker which attention impl its layers use.

    Needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (set by the parents in this folder) because
    the probe travels to the engine process as a pickled function. Returns ``["?: <error>"]``
    instead of raising: the log line is the primary evidence, this is a cross-check.
    """
    try:
        import cloudpickle

        # The engine process may not have this folder on sys.path: ship the function by value.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        per_worker = llm.apply_model(attention_impls)
        return sorted({x for worker in per_worker for x in worker})
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return [f"?: {type(e).__name__}: {str(e)[:200]}"]


def start_dummy_engine(args: Any) -> tuple[Any, dict[str, Any]]:
    """A vLLM engine on ``args.model`` with dummy weights and token-id prompts, as every
    speed and serve run here uses it; also returns its start time, attention impls and run info.

    ``args`` carries model, backend, max_model_len, gpu_mem, enforce_eager and seed.
    """
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        attention_backend=args.backend,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_mem,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
    )
    info = {
        "engine_start_s": time.perf_counter() - t0,
        "impls": probe_attention_impls(llm),
        "run_info": run_info(False),
    }
    return llm, info


def child_env(backend: str, route: str | None = None) -> dict[str, str]:
    """Environment for an engine child: the probe's serialization switch, quieter start-up,
    and the kernel route for our backend only."""
    env = {
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if route and backend == "CUSTOM":
        env["PORTABLE_ATTN_ROUTE"] = route
    return env


# --------------------------------------------------------------------------------------------
# Inside an engine, per worker (tensor parallelism): what every worker process really runs.
# These are sent to the workers with ``LLM.collective_rpc`` (the function travels by value
# through cloudpickle, and is called as ``fn(worker)``). Unlike ``apply_model``, whose function
# argument the multiprocess executor pickles by reference (which fails for functions of this
# folder when TP > 1), a callable ``method`` is cloudpickled at every hop.
# --------------------------------------------------------------------------------------------


def _attention_layers(worker: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every attention layer of the worker's model."""
    layers = []
    for name, module in worker.get_model().named_modules():
        if getattr(module, "impl", None) is not None and getattr(module, "attn_backend", None):
            layers.append((name, module))
    return layers


def worker_attention_report(worker: Any) -> dict[str, Any]:
    """Runs in a vLLM worker: its rank and device, the plugin's registration state in this
    process, and per attention layer the backend, impl class and the attention features the
    impl was constructed with (sliding window, soft cap, KV-cache dtype, head counts)."""
    import os as _os

    def plain(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        return repr(x)

    report: dict[str, Any] = {
        "rank": getattr(worker, "rank", None),
        "local_rank": getattr(worker, "local_rank", None),
        "pid": _os.getpid(),
        "device": str(getattr(worker, "device", None)),
        "env_route": _os.environ.get("PORTABLE_ATTN_ROUTE"),
        "env_plugins": _os.environ.get("VLLM_PLUGINS"),
    }
    plugin: dict[str, Any] = {}
    try:
        import vllm_portable_attn

        plugin["registered"] = bool(getattr(vllm_portable_attn, "_registered", False))
        plugin["expected_path"] = vllm_portable_attn.BACKEND_CLASS_PATH
        plugin["module_file"] = vllm_portable_attn.__file__
    except Exception as e:  # noqa: BLE001 - diagnostics only
        plugin["error"] = f"import vllm_portable_attn: {type(e).__name__}: {e}"
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        custom = AttentionBackendEnum.CUSTOM
        plugin["custom_path"] = custom.get_path() if custom.is_overridden() else None
    except Exception as e:  # noqa: BLE001
        plugin["custom_path_error"] = f"{type(e).__name__}: {e}"
    report["plugin"] = plugin
    layers = []
    try:
        for name, layer in _attention_layers(worker):
            impl = layer.impl
            try:
                backend = layer.attn_backend.get_name()
            except Exception:  # noqa: BLE001
                backend = "?"
            seen = getattr(impl, "_e2e_query_dtypes", None)
            layers.append(
                {
                    "name": name,
                    "backend": backend,
                    "impl": f"{type(impl).__module__}.{type(impl).__qualname__}",
                    "sliding_window": plain(getattr(impl, "sliding_window", None)),
                    "logits_soft_cap": plain(getattr(impl, "logits_soft_cap", None)),
                    "kv_cache_dtype": plain(getattr(impl, "kv_cache_dtype", None)),
                    "num_heads": plain(getattr(impl, "num_heads", None)),
                    "num_kv_heads": plain(getattr(impl, "num_kv_heads", None)),
                    "head_size": plain(getattr(impl, "head_size", None)),
                    "query_quant": getattr(layer, "query_quant", None) is not None,
                    "query_dtypes_seen": None if seen is None else sorted(seen),
                }
            )
    except Exception as e:  # noqa: BLE001
        report["layers_error"] = f"{type(e).__name__}: {e}"
    report["layers"] = layers
    return report


def worker_disable_query_quant(worker: Any) -> dict[str, int]:
    """Runs in a vLLM worker: drop the fp8 query quantization that ``Attention`` applies before
    backends that accept fp8 queries (TRITON_ATTN on CUDA with an fp8 KV cache), so that such a
    reference computes with bf16 queries over the fp8 cache, as CUSTOM does. Only effective
    without torch.compile (``enforce_eager``): compiled graphs have the quantization baked in."""
    layers = _attention_layers(worker)
    disabled = 0
    for _, layer in layers:
        if getattr(layer, "query_quant", None) is not None:
            layer.query_quant = None
            disabled += 1
    return {"layers": len(layers), "disabled": disabled}


def worker_record_query_dtypes(worker: Any) -> int:
    """Runs in a vLLM worker: wrap each attention impl's ``forward`` so that it records the
    dtype of the queries it receives (``worker_attention_report`` lists them). Eager only."""
    count = 0
    for _, layer in _attention_layers(worker):
        impl = layer.impl
        if getattr(impl, "_e2e_query_dtypes", None) is not None:
            continue
        seen: set[str] = set()
        original = impl.forward

        def forward(attn_layer, query, *args, _original=original, _seen=seen, **kwargs):
            _seen.add(str(query.dtype).replace("torch.", ""))
            return _original(attn_layer, query, *args, **kwargs)

        impl._e2e_query_dtypes = seen
        impl.forward = forward
        count += 1
    return count


def call_workers(llm: Any, fn: Any) -> tuple[list[Any] | None, str | None]:
    """``llm.collective_rpc(fn)`` (one result per worker, in rank order), or ``(None, error)``.

    Needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (``child_env`` sets it)."""
    try:
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        return list(llm.collective_rpc(fn)), None
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return None, f"{type(e).__name__}: {str(e)[:300]}"


#: Settings for engines with tensor parallelism on the lent multi-GPU hosts: NVLink multicast
#: must stay off there (it can take the shared host's GPUs out of service), and vLLM's
#: all-reduce variants that could try it (torch symmetric memory, FlashInfer, NCCL symmetric
#: memory) are switched off; NCCL and vLLM's custom all-reduce (CUDA IPC) remain.
TP_SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
    "VLLM_ALLREDUCE_USE_FLASHINFER": "0",
    "VLLM_USE_NCCL_SYMM_MEM": "0",
}


def visible_gpu_count() -> int | None:
    """GPUs this process may use, from nvidia-smi (no CUDA context) and CUDA_VISIBLE_DEVICES;
    ``None`` if nvidia-smi is unavailable."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    n = len(out)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"]))
    return n
