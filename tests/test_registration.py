"""Registration and selection: what vLLM sees before any kernel runs.

These run on a CPU-only host. The entry-point test needs the package installed
(`pip install -e .`), as .ci/run does.
"""

from __future__ import annotations

import ast
import inspect
import logging
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.registry import AttentionBackendEnum

import vllm_portable_attn
from vllm_portable_attn import _compat, envs
from vllm_portable_attn.backend import PortableAttentionBackend

PACKAGE_DIR = Path(vllm_portable_attn.__file__).parent
H100 = DeviceCapability(9, 0)
A100 = DeviceCapability(8, 0)


@pytest.fixture
def registered() -> None:
    vllm_portable_attn.register()


class _Capture(logging.Handler):
    """Collects records of one logger: vLLM's "vllm" logger does not propagate to pytest's."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def plugin_log():
    logger = logging.getLogger(vllm_portable_attn._LOGGER_NAME)
    handler = _Capture()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# -- plugin discovery -------------------------------------------------------------------------


def test_entry_point_is_installed() -> None:
    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert "portable_attn" in eps, (
        "entry point missing: install the package (pip install -e .) so vLLM can find it"
    )
    assert eps["portable_attn"].value == "vllm_portable_attn:register"
    assert eps["portable_attn"].load() is vllm_portable_attn.register


def test_vllm_plugin_loader_finds_register(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.plugins import load_plugins_by_group

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    plugins = load_plugins_by_group("vllm.general_plugins")
    assert plugins.get("portable_attn") is vllm_portable_attn.register
    # With VLLM_PLUGINS set, only the listed names load: ours must be listed by its name.
    monkeypatch.setenv("VLLM_PLUGINS", "portable_attn")
    assert list(load_plugins_by_group("vllm.general_plugins")) == ["portable_attn"]


def test_package_import_does_not_import_vllm() -> None:
    # vLLM imports every general plugin early in every process; importing us must stay cheap.
    code = (
        "import sys, vllm_portable_attn\n"
        "heavy = [m for m in ('vllm', 'torch', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_vllm_is_imported_only_in_compat() -> None:
    offenders = {
        str(path.relative_to(PACKAGE_DIR)): sorted(
            m for m in _imported_modules(path) if m == "vllm" or m.startswith("vllm.")
        )
        for path in PACKAGE_DIR.rglob("*.py")
        if path.name != "_compat.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# -- register() -------------------------------------------------------------------------------


def test_register_is_idempotent_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, plugin_log: list[logging.LogRecord]
) -> None:
    monkeypatch.setattr(vllm_portable_attn, "_registered", False)
    vllm_portable_attn.register()
    vllm_portable_attn.register()
    infos = [r for r in plugin_log if "registered as CUSTOM" in r.getMessage()]
    assert len(infos) == 1 and infos[0].levelno == logging.INFO
    assert AttentionBackendEnum.CUSTOM.get_path() == vllm_portable_attn.BACKEND_CLASS_PATH
    assert AttentionBackendEnum.CUSTOM.get_class() is PortableAttentionBackend


def test_registration_failure_is_loud(
    monkeypatch: pytest.MonkeyPatch, plugin_log: list[logging.LogRecord]
) -> None:
    def broken_register_backend(*args: object, **kwargs: object) -> None:
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(vllm_portable_attn, "_registered", False)
    monkeypatch.setattr(_compat, "register_backend", broken_register_backend)
    with pytest.raises(RuntimeError, match="registry exploded"):
        vllm_portable_attn.register()
    errors = [r for r in plugin_log if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "FAILED to register" in errors[0].getMessage()
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is RuntimeError
    # A failed attempt must not count as registered: the next call tries again.
    assert vllm_portable_attn._registered is False


def test_backend_identity(registered: None) -> None:
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend.get_name() == "CUSTOM"
    # Attention.__init__ maps get_name() back to an enum member.
    assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM
    assert backend.forward_includes_kv_cache_update is False
    assert backend.get_impl_cls().__name__ == "PortableAttentionImpl"
    assert backend.get_builder_cls().__name__ == "PortableAttentionMetadataBuilder"


# -- validate_configuration (what the platform runs when CUSTOM is selected) -----------------

BASE_CONFIG = dict(
    head_size=128,
    dtype=torch.bfloat16,
    kv_cache_dtype="auto",
    block_size=None,
    use_mla=False,
    has_sink=False,
    use_sparse=False,
    use_mm_prefix=False,
    use_per_head_quant_scales=False,
    device_capability=H100,
    attn_type="decoder",
    has_sliding_window=False,
)

ACCEPTED = {
    "bf16": {},
    "fp16": dict(dtype=torch.float16),
    "fp32": dict(dtype=torch.float32),
    "block16": dict(block_size=16),
    "block32": dict(block_size=32),
    "block128": dict(block_size=128),
    "head64": dict(head_size=64),
    "head80": dict(head_size=80),
    "head256": dict(head_size=256),
    "sliding_window": dict(has_sliding_window=True),
    "sinks": dict(has_sink=True),
    "fp8_kv": dict(kv_cache_dtype="fp8"),
    "fp8_e4m3_kv": dict(kv_cache_dtype="fp8_e4m3"),
    "fp8_e5m2_kv": dict(kv_cache_dtype="fp8_e5m2"),
    "bf16_kv": dict(kv_cache_dtype="bfloat16"),
    "fp16_kv": dict(dtype=torch.float16, kv_cache_dtype="float16"),
    "kv_connector": dict(use_kv_connector=True),
    "ampere_fp16": dict(dtype=torch.float16, device_capability=DeviceCapability(8, 0)),
    "ada_fp8": dict(kv_cache_dtype="fp8", device_capability=DeviceCapability(8, 9)),
    "ada_fp8_e5m2": dict(kv_cache_dtype="fp8_e5m2", device_capability=DeviceCapability(8, 9)),
    "everything": dict(has_sliding_window=True, has_sink=True, kv_cache_dtype="fp8", block_size=32),
}

# Selection inputs that only newer vLLM releases pass (0.33: adaptive verification, DCP, R-SWA).
_SELECTION_INPUTS = inspect.signature(PortableAttentionBackend.validate_configuration).parameters
if "use_adaptive_verification" in _SELECTION_INPUTS:
    # Host query lengths may then overstate the device's; the builder plans for that.
    ACCEPTED["adaptive_verification"] = dict(use_adaptive_verification=True)


@pytest.mark.parametrize("overrides", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_validate_configuration_accepts(registered: None, overrides: dict) -> None:
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend.validate_configuration(**{**BASE_CONFIG, **overrides}) == []


REJECTED = {
    "head48": (dict(head_size=48), "head_size not supported"),
    "head512": (dict(head_size=512), "head_size not supported"),
    "block8": (dict(block_size=8), "block_size not supported"),
    "block24": (dict(block_size=24), "block_size not supported"),
    "float64": (dict(dtype=torch.float64), "dtype not supported"),
    "int8_kv": (dict(kv_cache_dtype="int8_per_token_head"), "kv_cache_dtype not supported"),
    "encoder": (dict(attn_type="encoder"), "attention type encoder not supported"),
    "encoder_only": (dict(attn_type="encoder_only"), "attention type encoder_only not supported"),
    "cross": (dict(attn_type="encoder_decoder"), "attention type encoder_decoder not supported"),
    "mla": (dict(use_mla=True), "MLA not supported"),
    "sparse": (dict(use_sparse=True), "sparse not supported"),
    "mm_prefix": (dict(use_mm_prefix=True), "partial multimodal token full attention"),
    "non_causal": (dict(use_non_causal=True), "non-causal attention not supported"),
    "batch_invariant": (dict(use_batch_invariant=True), "batch invariance not supported"),
    "per_head_scales": (dict(use_per_head_quant_scales=True), "per-head quant scales"),
    "pcp": (dict(use_pcp=True), "PCP not supported"),
    "fp8_on_ampere": (
        dict(kv_cache_dtype="fp8", device_capability=A100),
        "kv_cache_dtype fp8 needs compute capability >= 8.9 (got 8.0); "
        "supported here: auto, float16, bfloat16",
    ),
    "fp8_e4m3_on_ampere": (
        dict(kv_cache_dtype="fp8_e4m3", device_capability=A100),
        "kv_cache_dtype fp8_e4m3 needs compute capability >= 8.9 (got 8.0); "
        "supported here: auto, float16, bfloat16",
    ),
    "fp8_e5m2_on_ampere": (
        dict(kv_cache_dtype="fp8_e5m2", device_capability=A100),
        "kv_cache_dtype fp8_e5m2 needs compute capability >= 8.9 (got 8.0); "
        "supported here: auto, float16, bfloat16",
    ),
    "bf16_on_turing": (
        dict(device_capability=DeviceCapability(7, 5)),
        "bfloat16 needs compute capability >= 8.0",
    ),
    "kv_dtype_mismatch": (
        dict(dtype=torch.bfloat16, kv_cache_dtype="float16"),
        "kv_cache_dtype float16 differs from the model dtype",
    ),
}

if "use_dcp" in _SELECTION_INPUTS:  # 0.33: the impl's supports_dcp (False: we return no LSE)
    REJECTED["dcp"] = (dict(use_dcp=True), "DCP not supported")
if "use_rswa" in _SELECTION_INPUTS:  # 0.33: R-SWA (per-request sliding windows)
    REJECTED["rswa"] = (dict(use_rswa=True), "R-SWA not supported")


@pytest.mark.parametrize("overrides, reason", REJECTED.values(), ids=REJECTED.keys())
def test_validate_configuration_rejects_with_reason(
    registered: None, overrides: dict, reason: str
) -> None:
    backend = AttentionBackendEnum.CUSTOM.get_class()
    reasons = backend.validate_configuration(**{**BASE_CONFIG, **overrides})
    assert len(reasons) == 1 and reason in reasons[0], reasons


def test_attention_config_accepts_custom(registered: None) -> None:
    # What `--attention-backend CUSTOM` / `attention_config={"backend": "custom"}` parse into.
    from vllm.config import AttentionConfig

    assert AttentionConfig(backend="custom").backend is AttentionBackendEnum.CUSTOM


# -- KV-cache geometry ------------------------------------------------------------------------


def test_kv_cache_shape_and_block_sizes() -> None:
    backend = PortableAttentionBackend
    assert backend.get_kv_cache_shape(10, 16, 4, 128) == (10, 4, 16, 256)
    assert backend.get_kv_cache_shape(10, 32, 2, 64, cache_dtype_str="fp8") == (10, 2, 32, 128)
    with pytest.raises(ValueError, match="multiple of 16"):
        backend.get_kv_cache_shape(10, 8, 4, 128)
    # 0.26 calls it without arguments, 0.33 passes the spec positionally.
    for spec in ((), (None,)):
        sizes = backend.get_supported_kernel_block_sizes(*spec)
        assert len(sizes) == 1 and isinstance(sizes[0], MultipleOf) and sizes[0].base == 16
    assert backend.get_preferred_block_size(16) == 16


@pytest.mark.skipif(
    not _compat.KV_CACHE_SHAPE_FROM_BACKEND,
    reason="this vLLM allocates the KV cache from the spec and a KVCacheLayout, not from the "
    "backend's stride order (tests/test_backend.py runs the impl on every such layout)",
)
@pytest.mark.parametrize(
    "layout, order, layered_order",
    [("NHD", (0, 2, 1, 3), (1, 0, 3, 2, 4)), ("HND", (0, 1, 2, 3), (1, 2, 0, 3, 4))],
)
def test_kv_cache_stride_order_follows_vllm_layout(
    monkeypatch: pytest.MonkeyPatch, layout: str, order: tuple, layered_order: tuple
) -> None:
    from vllm.v1.attention.backends.utils import get_kv_cache_layout

    monkeypatch.setenv("VLLM_KV_CACHE_LAYOUT", layout)
    get_kv_cache_layout.cache_clear()
    try:
        assert PortableAttentionBackend.get_kv_cache_stride_order() == order
        assert PortableAttentionBackend.get_kv_cache_stride_order(True) == layered_order
        # vLLM gates page padding and cross-layer layouts on this; same answer as TRITON_ATTN.
        assert PortableAttentionBackend.indexes_kv_by_block_stride()
    finally:
        get_kv_cache_layout.cache_clear()


def test_stride_order_gives_nhd_memory_for_packed_kv() -> None:
    # Replays vLLM's allocation (attn_utils: view the raw buffer in physical order, permute back)
    # and checks the logical view's strides are NHD: [blocks, block_size, heads, 2*hs] in memory.
    nb, hkv, bs, d = 3, 2, 16, 8
    shape = PortableAttentionBackend.get_kv_cache_shape(nb, bs, hkv, d)
    order = PortableAttentionBackend.get_kv_cache_stride_order()
    physical = torch.empty([shape[i] for i in order])
    inverse = [order.index(i) for i in range(len(order))]
    logical = physical.permute(*inverse)
    assert logical.shape == (nb, hkv, bs, 2 * d)
    assert logical.stride() == (bs * hkv * 2 * d, 2 * d, hkv * 2 * d, 1)


def test_bad_route_is_refused_at_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envs.ROUTE_ENV, "fastest")
    envs.reset_cache()
    try:
        reasons = PortableAttentionBackend.validate_configuration(**BASE_CONFIG)
    finally:
        monkeypatch.undo()
        envs.reset_cache()
    assert len(reasons) == 1 and "PORTABLE_ATTN_ROUTE='fastest' is not valid" in reasons[0]


@pytest.mark.parametrize(
    "arch, kv_cache_dtype, accepted",
    [
        ("gfx942", "fp8", True),
        ("gfx950", "fp8_e4m3", True),
        ("gfx90a", "fp8", False),  # MI200: no fp8 hardware, and not compile-checked
        ("gfx90a", "auto", True),
    ],
)
def test_fp8_kv_on_rocm_needs_a_checked_arch(
    monkeypatch: pytest.MonkeyPatch, arch: str, kv_cache_dtype: str, accepted: bool
) -> None:
    from vllm_portable_attn import backend as backend_module

    monkeypatch.setattr(backend_module.current_platform, "is_rocm", lambda: True)
    monkeypatch.setattr(backend_module, "_rocm_gcn_arch", lambda: arch)
    reasons = PortableAttentionBackend.validate_configuration(
        **{**BASE_CONFIG, "kv_cache_dtype": kv_cache_dtype}
    )
    if accepted:
        assert reasons == []
    else:
        assert len(reasons) == 1 and "needs one of gfx942, gfx950 (got gfx90a)" in reasons[0]


@pytest.mark.parametrize("arch", ["gfx942", "gfx950", "gfx90a"])
def test_fp8_e5m2_is_refused_on_rocm(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """MI300 uses the fnuz fp8 variants, and no e5m2 kernel is compile-checked for AMD."""
    from vllm_portable_attn import backend as backend_module

    monkeypatch.setattr(backend_module.current_platform, "is_rocm", lambda: True)
    monkeypatch.setattr(backend_module, "_rocm_gcn_arch", lambda: arch)
    reasons = PortableAttentionBackend.validate_configuration(
        **{**BASE_CONFIG, "kv_cache_dtype": "fp8_e5m2"}
    )
    assert reasons == [
        "kv_cache_dtype fp8_e5m2 is not supported on ROCm; "
        "supported: auto, float16, bfloat16, fp8, fp8_e4m3"
    ]
