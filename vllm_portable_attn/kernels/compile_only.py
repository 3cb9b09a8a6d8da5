"""Run the public launchers without launching: their kernels compile (and load) now instead.

Triton compiles a kernel specialisation the first time a launch needs it, which in a served
engine means inside some later request's step (a latency spike vLLM's JIT monitor reports).
Inside `compile_only()`, `kernel[grid](...)` of every kernel of this package goes through
Triton's own argument binding and in-memory cache, exactly as a launch would, compiles what
is missing, loads the binary onto the GPU, and returns without launching. Calling the real
launchers this way, with the real tensors' dtypes and strides, is what makes the compiled
specialisations the ones later launches look up: Triton keys them on 16-byte divisibility of
every pointer and integer argument, which a hand-written signature would have to guess.

With `threads` > 1 the compiles run on a thread pool through Triton's own AsyncCompileMode:
Triton's compiler passes release Python's lock and ptxas runs as a child process, so threads
compile in parallel (a Llama-8B layer's precompile on an H200 host: about 10 s on 8 threads
against 48-51 s on one; `benchmarks/bench.py precompile`).

Compiled kernels only: under TRITON_INTERPRET the kernels are interpreted functions, which
this cannot intercept, so callers must not use it there (nothing compiles there anyway).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from triton import knobs
from triton.runtime.jit import JITFunction

try:  # Triton >= 3.4; a Triton without it compiles on the calling thread (`compile_threads`)
    from triton.runtime._async_compile import AsyncCompileMode, active_mode
except ImportError:  # pragma: no cover - depends on the installed Triton
    AsyncCompileMode = None

#: Replacement for one kernel's `run`, made from (module name, attribute name, kernel).
RunFactory = Callable[[str, str, JITFunction], Callable[..., Any]]


def jit_kernels() -> list[tuple[str, str, JITFunction]]:
    """(module, attribute, JITFunction) of every @triton.jit object in the kernel package."""
    package = importlib.import_module(__package__)
    found = []
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for attr, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.__module__ == module.__name__:
                found.append((module.__name__, attr, obj))
    if not found:
        raise RuntimeError(
            "no compilable @triton.jit kernels found; is TRITON_INTERPRET set? "
            "(interpreted kernels cannot be compiled: unset it)"
        )
    return found


@contextlib.contextmanager
def run_replaced(make_run: RunFactory) -> Iterator[None]:
    """Replace each kernel's `run` with `make_run(module, name, kernel)` inside the block.

    `kernel[grid](...)` resolves `self.run` at call time, so an instance attribute shadows the
    class method; deleting it restores the real one.
    """
    kernels = jit_kernels()
    for module, name, fn in kernels:
        fn.run = make_run(module, name, fn)
    try:
        yield
    finally:
        for _, _, fn in kernels:
            del fn.run


@dataclass
class CompileCount:
    """What happened inside one `compile_only()` block."""

    launches: int = 0  # launcher calls intercepted
    compiled: int = 0  # of those, specialisations Triton had not compiled in this process
    threads: int = 1  # threads the block compiled on (`compile_threads`)


def compile_threads(requested: int) -> int:
    """The compile threads `compile_only(requested)` will use: 1 where this Triton has no
    AsyncCompileMode, or one is active already (its owner's pool then compiles)."""
    if AsyncCompileMode is None or active_mode.get() is not None:
        return 1
    return max(1, requested)


@contextlib.contextmanager
def _compiling_on(threads: int) -> Iterator[None]:
    """Triton's compiles inside the block run on `threads` threads (see `compile_threads`);
    the block ends once every one of them has finished."""
    if threads <= 1:
        yield
        return
    with (
        ThreadPoolExecutor(threads, thread_name_prefix="portable-attn-compile") as pool,
        AsyncCompileMode(pool),  # its exit waits for the compiles and files them in the caches
    ):
        yield


@contextlib.contextmanager
def compile_only(threads: int = 1) -> Iterator[CompileCount]:
    """Inside the block, launches of this package's kernels compile and load but do not run.

    Yields a `CompileCount`, filled in as the block runs. Triton's post-compile hook (vLLM's
    JIT monitor installs one once serving starts) is still called for every compile. With
    `threads` > 1 (`compile_threads`), the compiles run in parallel and finish, and the
    kernels load onto the GPU, when the block ends.
    """
    count = CompileCount(threads=compile_threads(threads))
    chained_hook = knobs.runtime.jit_post_compile_hook

    def counting_hook(**kwargs: Any) -> Any:
        count.compiled += 1
        return chained_hook(**kwargs) if chained_hook is not None else None

    def make_run(module: str, name: str, fn: JITFunction) -> Callable[..., Any]:
        del module, name

        def compile_instead(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            del warmup
            count.launches += 1
            kernel = JITFunction.run(fn, *args, grid=grid, warmup=True, **kwargs)
            # None: a `knobs.runtime.jit_cache_hook` took the compile over, as Triton allows.
            if kernel is not None:
                kernels.append(kernel)

        return compile_instead

    # Compiled kernels, or futures of them (AsyncCompileMode), one per intercepted launch.
    kernels: list[Any] = []
    knobs.runtime.jit_post_compile_hook = counting_hook
    try:
        with run_replaced(make_run), _compiling_on(count.threads):
            yield count
        # Load them onto the GPU now too (Triton otherwise does so at the first launch); this
        # is also where a launch asking for more shared memory than the GPU has would fail.
        for kernel in kernels:
            if hasattr(kernel, "result"):  # a FutureKernel of AsyncCompileMode, finished
                kernel = kernel.result()
            kernel._init_handles()
    finally:
        knobs.runtime.jit_post_compile_hook = chained_hook
