"""Shared test set-up.

Without a GPU the Triton kernels run on the CPU through Triton's interpreter. The variable
must be set before Triton is first imported, which is why it lives at the top of conftest.
"""

import os
from collections.abc import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# vLLM 0.26 resolves the KV layout from the current config unless this is set.
os.environ.setdefault("VLLM_KV_CACHE_LAYOUT", "NHD")


def _let_interpreter_unwrap_constexpr_tensors() -> None:
    """Work around a Triton 3.8 interpreter regression (vLLM 0.33 pins Triton 3.8).

    Under the interpreter a jit function is plain Python, so ``C * x`` with a ``tl.constexpr``
    ``C`` on the left (e.g. ``tl.exp2((2.0 * LOG2E) * x)``) runs ``constexpr.__mul__`` and yields
    a constexpr *wrapping a tensor*. Triton 3.6's ``TritonSemantic.to_tensor`` unwrapped any
    constexpr; 3.8's unwraps only Python scalars and raises "cannot convert ... to tensor".
    Compiled kernels never see such a value (the code generator dispatches ``C * x`` to the
    tensor's reflected operator), so this affects the interpreter only, and the patch below only
    restores 3.6's unwrapping. It changes nothing where that already works.
    """
    from triton.language import constexpr
    from triton.language.semantic import TritonSemantic

    to_tensor = TritonSemantic.to_tensor
    if getattr(to_tensor, "_unwraps_constexpr_tensors", False):
        return

    def unwrapping_to_tensor(self, x, *args, **kwargs):
        while isinstance(x, constexpr) and isinstance(x.value, self.tensor):
            x = x.value
        return to_tensor(self, x, *args, **kwargs)

    unwrapping_to_tensor._unwraps_constexpr_tensors = True
    TritonSemantic.to_tensor = unwrapping_to_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _let_interpreter_unwrap_constexpr_tensors()

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA or ROCm GPU; skipped without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, str], list[dict]]:
    """`spy(module, name)` wraps `module.name` for the test: each call's keyword arguments are
    recorded in the returned list, then the original runs."""

    def wrap(module: object, name: str) -> list[dict]:
        calls: list[dict] = []
        original = getattr(module, name)

        def record(*args: object, **kwargs: object) -> object:
            calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, record)
        return calls

    return wrap
