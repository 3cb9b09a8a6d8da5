"""The backend end to end through vLLM's own objects, without an engine.

Each test builds vLLM's real `VllmConfig`, `FullAttentionSpec` and `CommonAttentionMetadata`,
then runs what vLLM runs per layer and step: builder.build() -> impl.do_kv_cache_update() ->
impl.forward(). Results are compared with the plain-PyTorch reference on a cache written by
plain indexing, so a wrong cache write and a wrong attention both fail. Without a GPU the
kernels run under Triton's interpreter (tests/conftest.py), so CPU cases stay small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import random
import threading
import types
from collections.abc import Callable, Iterator

import pytest
import torch
import triton.compiler
from paged_batch import (
    PagedBatch,
    fp8_batch,
    fp8_written_caches,
    make_batch,
    scatter_new_tokens,
)
from torch.utils._python_dispatch import TorchDispatchMode
from triton import knobs
from vllm.config import CacheConfig, DeviceConfig, SchedulerConfig, VllmConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_portable_attn import _compat, envs
from vllm_portable_attn import impl as impl_module
from vllm_portable_attn import plan as plan_module
from vllm_portable_attn import precompile as precompile_module
from vllm_portable_attn.backend import PortableAttentionBackend
from vllm_portable_attn.impl import PortableAttentionImpl
from vllm_portable_attn.kernels import MAX_DECODE_QUERY_LEN
from vllm_portable_attn.kernels import grouped as grouped_module
from vllm_portable_attn.kernels.compile_only import CompileCount, compile_threads, jit_kernels
from vllm_portable_attn.plan import PortableAttentionMetadata, PortableAttentionMetadataBuilder
from vllm_portable_attn.precompile import StepShape, step_shapes
from vllm_portable_attn.reference import paged_attention_reference

LAYER = "model.layers.0.self_attn.attn"

# tests/conftest.py's `spy` fixture.
Spy = Callable[[object, str], list[dict]]

# Kernel (fp16/fp32 storage, fp32 accumulation) against the fp32 reference.
TOLERANCE = {
    torch.float32: dict(atol=1e-3, rtol=1e-3),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# (query_len, context_len) in Model Runner V2 order: decodes first, then ascending query
# length, so a fresh 17-token prompt precedes a 63-token chunked-prefill continuation.
MIXED = [(1, 16), (1, 40), (5, 1), (17, 0), (63, 40)]
# Decodes and spec-decode verifies (q <= 8): the batches that split KV.
DECODES = [(1, 15), (1, 100), (3, 60), (8, 120), (1, 1)]
# A GPU this size makes the split-KV policy choose a few segments for these small batches
# (a 132-SM H100 would choose 32: same code path, 8x the interpreter time).
SPLIT_NUM_SMS = 16


@pytest.fixture(params=["unified", "grouped"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs the test once per kernel route, selected the way users select it."""
    monkeypatch.setenv(envs.ROUTE_ENV, request.param)
    envs.reset_cache()
    yield request.param
    monkeypatch.undo()
    envs.reset_cache()


class FakeAttentionLayer(AttentionLayerBase):
    """What vLLM's Attention layer offers the impl and the builder, and nothing else.

    Registered in the static forward context, where the builder finds the query-head count.
    """

    def __init__(
        self,
        impl: PortableAttentionImpl,
        spec: FullAttentionSpec,
        device: str,
        fp8_scales: tuple[float, float] | None = None,
    ) -> None:
        self.impl = impl
        self.layer_name = LAYER
        self._spec = spec
        k_scale, v_scale = fp8_scales or (1.0, 1.0)
        # 0-dim fp32 device tensors, as vLLM's Attention layer holds them.
        self._k_scale = torch.tensor(k_scale, dtype=torch.float32, device=device)
        self._v_scale = torch.tensor(v_scale, dtype=torch.float32, device=device)
        self._q_scale = torch.tensor(1.0, dtype=torch.float32, device=device)
        self._k_scale_float, self._v_scale_float, self._q_scale_float = k_scale, v_scale, 1.0

    def get_attn_backend(self) -> type[PortableAttentionBackend]:
        return PortableAttentionBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> FullAttentionSpec:
        return self._spec


def make_vllm_config(block_size: int) -> VllmConfig:
    # model_config=None is allowed; device "cpu" because a GPU-less host cannot infer one.
    return VllmConfig(
        device_config=DeviceConfig(device="cpu"),
        cache_config=CacheConfig(block_size=block_size),
        scheduler_config=SchedulerConfig.default_factory(
            max_num_seqs=16, max_num_batched_tokens=256
        ),
    )


def common_metadata(batch: PagedBatch, *, padded: bool) -> CommonAttentionMetadata:
    """vLLM's per-step metadata for `batch`.

    padded=True is FULL-graph mode: num_actual_tokens counts the padding tokens too.
    """
    qsl = batch.query_start_loc
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl.cpu(),
        seq_lens=batch.seq_lens,
        num_reqs=batch.seq_lens.shape[0],
        num_actual_tokens=batch.query.shape[0] if padded else batch.num_actual_tokens,
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
        block_table_tensor=batch.block_table,
        slot_mapping=batch.slot_mapping,
        seq_lens_cpu_upper_bound=batch.seq_lens.cpu(),
    )


@dataclasses.dataclass
class Setup:
    cfg: VllmConfig
    spec: FullAttentionSpec
    impl: PortableAttentionImpl
    layer: FakeAttentionLayer
    builder: PortableAttentionMetadataBuilder


def make_setup(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    kv_cache_dtype: str = "auto",
    fp8_scales: tuple[float, float] | None = None,
    register_layer: bool = True,
    precompile: bool = False,
    **impl_features: object,
) -> Setup:
    """Construct impl, layer and builder in vLLM's order: layers at model init, then builders.

    precompile=False (the default) turns the builder's precompile off, so each GPU test
    compiles only what it launches."""
    cfg = make_vllm_config(block_size)
    spec = FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        dtype=torch.uint8 if kv_cache_dtype.startswith("fp8") else dtype,
        sliding_window=impl_features.get("sliding_window"),
    )
    impl_cls = PortableAttentionBackend.get_impl_cls()
    impl = impl_cls(
        num_heads,
        head_size,
        head_size**-0.5,
        num_kv_heads,
        impl_features.get("alibi_slopes"),
        impl_features.get("sliding_window"),
        kv_cache_dtype,
        impl_features.get("logits_soft_cap"),
        AttentionType.DECODER,
        None,
        **({"sinks": impl_features["sinks"]} if "sinks" in impl_features else {}),
    )
    layer = FakeAttentionLayer(impl, spec, device, fp8_scales)
    if register_layer:
        cfg.compilation_config.static_forward_context[LAYER] = layer
    builder = PortableAttentionBackend.get_builder_cls()(spec, [LAYER], cfg, torch.device(device))
    if not precompile:
        builder.precompile = None
    return Setup(cfg, spec, impl, layer, builder)


@dataclasses.dataclass(frozen=True)
class Model:
    """One attention geometry, shared by a test's setup and its batches (the page size is the
    cache's block size). The default is the small GQA 4:1 model the CPU tests run."""

    device: str
    num_heads: int = 8
    num_kv_heads: int = 2
    head_size: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.float16

    def _common(self) -> dict:
        return dict(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip

    def setup(self, **options: object) -> Setup:
        return make_setup(block_size=self.block_size, **self._common(), **options)

    def batch(self, requests: list[tuple[int, int]], **options: object) -> PagedBatch:
        return make_batch(requests, page_size=self.block_size, **self._common(), **options)


# Llama-3.1-8B's attention, for the GPU tests: Model(device, **LLAMA_8B).
LLAMA_8B = dict(num_heads=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)


def oracle_copy(batch: PagedBatch) -> PagedBatch:
    """The batch with its own copy of the cache, the new tokens scattered in by plain torch."""
    physical = batch.kv_cache.permute(0, 2, 1, 3).clone()
    kv_cache = physical.permute(0, 2, 1, 3)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(batch.head_size, dim=-1)
    oracle = dataclasses.replace(
        batch, kv_cache=kv_cache, key_cache=key_cache, value_cache=value_cache
    )
    scatter_new_tokens(oracle)
    return oracle


def run_step(setup: Setup, batch: PagedBatch, md: PortableAttentionMetadata) -> torch.Tensor:
    """do_kv_cache_update + forward, as vLLM's two custom ops call them; NaN-poisoned output."""
    setup.impl.do_kv_cache_update(
        setup.layer, batch.key, batch.value, batch.kv_cache, batch.slot_mapping
    )
    output = torch.full_like(batch.query, float("nan"))
    returned = setup.impl.forward(
        setup.layer, batch.query, batch.key, batch.value, batch.kv_cache, md, output=output
    )
    assert returned is output
    return output


def reference(setup: Setup, oracle: PagedBatch, **features: object) -> torch.Tensor:
    out = torch.full(oracle.query.shape, float("nan"), dtype=torch.float32, device="cpu")
    paged_attention_reference(
        oracle.query.cpu(),
        oracle.key_cache.cpu(),
        oracle.value_cache.cpu(),
        out,
        oracle.query_start_loc.cpu(),
        oracle.seq_lens.cpu(),
        oracle.block_table.cpu(),
        max_query_len=oracle.max_query_len,
        max_seq_len=oracle.max_seq_len,
        softmax_scale=setup.impl.scale,
        **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in features.items()},
    )
    return out


def assert_matches(got: torch.Tensor, want: torch.Tensor, num_real: int) -> None:
    tolerance = TOLERANCE[got.dtype]
    got, want = got[:num_real].float().cpu(), want[:num_real]
    assert not got.isnan().any(), "real output rows were left unwritten (NaN)"
    err = (got - want).abs().max().item()
    torch.testing.assert_close(got, want, **tolerance, msg=lambda m: f"max abs err {err:.3g}\n{m}")


def check_cache_write(batch: PagedBatch, oracle: PagedBatch) -> None:
    assert torch.equal(batch.key_cache, oracle.key_cache), "K cache differs from plain scatter"
    assert torch.equal(batch.value_cache, oracle.value_cache), "V cache differs from scatter"


# --------------------------------------------------------------------------- end to end

CASES = {
    # name: (dtype, block_size, head_size, padded, impl features)
    "fp16-bs16-padded": (torch.float16, 16, 64, True, {}),
    "fp32-bs32-eager": (torch.float32, 32, 32, False, {}),
    "fp16-bs16-window-softcap-sinks": (
        torch.float16,
        16,
        64,
        True,
        dict(sliding_window=20, logits_soft_cap=25.0, sinks="random"),
    ),
    "fp32-bs32-alibi": (torch.float32, 32, 32, False, dict(alibi_slopes="standard")),
}


def materialise(features: dict, num_heads: int, dtype: torch.dtype, device: str) -> dict:
    """Turn feature placeholders into the objects vLLM would pass (sinks: a model parameter)."""
    features = dict(features)
    gen = torch.Generator().manual_seed(11)
    if features.get("sinks") == "random":
        features["sinks"] = (torch.randn(num_heads, generator=gen) * 2).to(dtype).to(device)
    if features.get("alibi_slopes") == "standard":
        features["alibi_slopes"] = [2.0 ** (-8.0 * (i + 1) / num_heads) for i in range(num_heads)]
    return features


def reference_features(features: dict) -> dict:
    """The same features in the reference's (= kernel launcher's) vocabulary."""
    out = {}
    if "sliding_window" in features:
        out["sliding_window"] = features["sliding_window"]
    if "logits_soft_cap" in features:
        out["softcap"] = features["logits_soft_cap"]
    if "sinks" in features:
        out["sinks"] = features["sinks"].float()
    if "alibi_slopes" in features:
        out["alibi_slopes"] = torch.tensor(features["alibi_slopes"], dtype=torch.float32)
    return out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_mixed_batch_end_to_end(case: tuple, route: str, device: str) -> None:
    dtype, block_size, head_size, padded, features = case
    num_heads, num_kv_heads = 8, 2  # GQA 4:1
    features = materialise(features, num_heads, dtype, device)
    model = Model(device, num_heads, num_kv_heads, head_size, block_size, dtype)
    setup = model.setup(**features)
    batch = model.batch(MIXED, num_padded_requests=2, num_padding_tokens=3, seed=5)
    oracle = oracle_copy(batch)

    md = setup.builder.build(0, common_metadata(batch, padded=padded))
    assert md.route == route and (md.request_groups is not None) == (route == "grouped")
    assert md.num_segments == 1  # prefill-shaped batch: never split
    output = run_step(setup, batch, md)

    check_cache_write(batch, oracle)
    assert_matches(
        output, reference(setup, oracle, **reference_features(features)), batch.num_actual_tokens
    )
    if not padded:
        # forward() runs on query[:num_actual_tokens] only; rows past it stay untouched.
        assert output[batch.num_actual_tokens :].isnan().all()


@pytest.mark.parametrize("block_size", [16, 32])
def test_split_kv_decode_end_to_end(block_size: int, route: str, device: str) -> None:
    """A decode / spec-verify batch split into KV segments, padded as in FULL mode."""
    model = Model(device, block_size=block_size)
    setup = model.setup()
    setup.builder.num_sms = SPLIT_NUM_SMS
    assert setup.builder.workspace is not None
    for buf in (
        setup.builder.workspace.partial_out,
        setup.builder.workspace.partial_max,
        setup.builder.workspace.partial_sum,
    ):
        buf.fill_(float("nan"))
    batch = model.batch(DECODES, num_padded_requests=2, num_padding_tokens=3, seed=7)
    oracle = oracle_copy(batch)

    md = setup.builder.build(0, common_metadata(batch, padded=True))
    assert md.num_segments > 1 and md.workspace is setup.builder.workspace
    output = run_step(setup, batch, md)

    check_cache_write(batch, oracle)
    assert_matches(output, reference(setup, oracle), batch.num_actual_tokens)


def test_full_graph_replay_with_stale_launch_scalars(
    route: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under cudagraph_mode=FULL a graph captured for a decode-shaped batch is replayed for a
    mixed batch of the same padded size: vLLM refills the persistent input buffers in place,
    while the launch keeps the scalars of capture time (max_query_len=1, split-KV segments).
    The result must still be right."""
    num_tokens, num_reqs = 24, 4
    model = Model(device)
    setup = model.setup()
    setup.builder.num_sms = SPLIT_NUM_SMS
    captured = model.batch(
        [(1, 30), (1, 7), (1, 50), (1, 3)], num_padding_tokens=num_tokens - num_reqs, seed=1
    )
    replayed = model.batch([(1, 20), (2, 9), (13, 0), (8, 33)], seed=2)
    assert replayed.query.shape[0] == num_tokens == captured.query.shape[0]

    # The runner's persistent buffers, wide enough for both batches' block tables.
    width = max(captured.block_table.shape[1], replayed.block_table.shape[1])
    persistent = dict(
        query_start_loc=torch.zeros(num_reqs + 1, dtype=torch.int32, device=device),
        seq_lens=torch.zeros(num_reqs, dtype=torch.int32, device=device),
        block_table=torch.zeros(num_reqs, width, dtype=torch.int32, device=device),
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device=device),
    )

    def load(batch: PagedBatch) -> PagedBatch:
        for name, buf in persistent.items():
            src = getattr(batch, name)
            buf.zero_()
            buf[tuple(slice(0, n) for n in src.shape)] = src
        return dataclasses.replace(batch, **persistent)

    md = setup.builder.build(0, common_metadata(load(captured), padded=True))
    assert md.max_query_len == 1 and md.num_segments > 1

    replayed = load(replayed)
    # vLLM still runs build() eagerly for the replayed step (on the grouped route that re-runs
    # the classifier into the builder's buffers); the graph then launches with md's scalars.
    setup.builder.build(0, common_metadata(replayed, padded=True))
    oracle = oracle_copy(replayed)
    # The graph holds the launches made while capturing, and a capture launches every group.
    monkeypatch.setattr(impl_module, "graph_capture_in_progress", lambda: True)
    output = run_step(setup, replayed, md)  # the decode-time plan, the mixed batch's data
    check_cache_write(replayed, oracle)
    assert_matches(output, reference(setup, oracle), replayed.num_actual_tokens)


def fp8_type_of(kv_cache_dtype: str) -> torch.dtype:
    """What vLLM's uint8 cache holds for an fp8 kv_cache_dtype (how FLASHINFER reads it)."""
    return torch.float8_e5m2 if kv_cache_dtype == "fp8_e5m2" else current_platform.fp8_dtype()


def run_fp8_case(
    setup: Setup, batch: PagedBatch, fp8: torch.dtype, *, split: bool, tolerance: dict
) -> None:
    """One step on an fp8 cache holding `fp8` values; the write and the attention checked
    against plain torch."""
    assert batch.key_cache.dtype == fp8
    want_k, want_v = fp8_written_caches(
        batch, setup.layer._k_scale_float, setup.layer._v_scale_float
    )

    md = setup.builder.build(0, common_metadata(batch, padded=True))
    assert (md.num_segments > 1) == split
    output = run_step(setup, batch, md)

    assert torch.equal(batch.key_cache.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(batch.value_cache.view(torch.uint8), want_v.view(torch.uint8))
    oracle = dataclasses.replace(batch, key_cache=want_k, value_cache=want_v)
    ref = reference(setup, oracle, k_scale=setup.layer._k_scale, v_scale=setup.layer._v_scale)
    n = batch.num_actual_tokens
    got = output[:n].float().cpu()
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref[:n], **tolerance)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("split", [False, True], ids=["mixed", "split"])
def test_fp8_kv_cache_end_to_end(kv_cache_dtype: str, split: bool, route: str, device: str) -> None:
    """fp8 KV cache at small sizes: the uint8 cache viewed as fp8, the layer's scales used."""
    model = Model(device)
    setup = model.setup(kv_cache_dtype=kv_cache_dtype, fp8_scales=(0.5, 0.25))
    setup.builder.num_sms = SPLIT_NUM_SMS
    batch = model.batch(
        DECODES if split else MIXED, num_padded_requests=1, num_padding_tokens=2, seed=3
    )
    fp8 = fp8_type_of(kv_cache_dtype)
    batch = fp8_batch(batch, fp8, 0.5, 0.25, exact=True)
    run_fp8_case(setup, batch, fp8, split=split, tolerance=TOLERANCE[torch.float16])


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("split", [False, True], ids=["nosplit", "split"])
def test_gpu_bf16_fp8_end_to_end(kv_cache_dtype: str, split: bool, route: str, device: str) -> None:
    """Real sizes on a GPU: bf16 model, fp8 KV cache, arbitrary (rounded) new K/V values."""
    requests = [(1, 3000), (1, 17), (4, 900)] if split else [(1, 2000), (300, 1000), (700, 0)]
    model = Model(device, **LLAMA_8B)
    setup = model.setup(kv_cache_dtype=kv_cache_dtype, fp8_scales=(0.5, 0.25))
    batch = model.batch(requests, num_padded_requests=2, num_padding_tokens=3)
    fp8 = fp8_type_of(kv_cache_dtype)
    batch = fp8_batch(batch, fp8, 0.5, 0.25, exact=False)
    run_fp8_case(setup, batch, fp8, split=split, tolerance=TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_unified_route_large_prefill_step(
    route_env: pytest.MonkeyPatch, device: str, spy: Spy
) -> None:
    """Real sizes through the builder's own minimum: on sm_90 a unified-route step with enough
    fresh-prefill tokens takes the TMA prefill; elsewhere it stays on the unified launch."""
    route_env.setenv(envs.ROUTE_ENV, "unified")
    model = Model(device, **LLAMA_8B)
    setup = model.setup()
    min_tokens = setup.builder.tma_prefill_min_tokens
    sm90 = torch.cuda.get_device_capability()[0] == 9 and torch.version.hip is None
    assert (min_tokens is not None) == sm90
    requests = [(1, 3000), (2600, 0), (300, 4000), (1500, 0), (6, 900)]
    assert min_tokens is None or 2600 + 1500 >= min_tokens, "the step must reach the minimum"
    tma_calls = spy(grouped_module, "tma_prefill_attention")
    batch = model.batch(requests, num_padded_requests=2, num_padding_tokens=4)
    oracle = oracle_copy(batch)
    md = setup.builder.build(0, common_metadata(batch, padded=True))
    assert (md.request_groups is not None) == sm90
    output = run_step(setup, batch, md)
    assert_matches(output, reference(setup, oracle), batch.num_actual_tokens)
    assert len(tma_calls) == int(sm90)


# ---------------------------------------------------------------------- edge behaviour


def test_profiling_run_without_metadata_returns_zeros(device: str) -> None:
    setup = Model(device, num_heads=4, num_kv_heads=1, head_size=32).setup()
    query = torch.randn(5, 4, 32, dtype=torch.float16, device=device)
    output = torch.full_like(query, float("nan"))
    placeholder_cache = torch.tensor([], device=device)  # what vLLM passes while profiling
    returned = setup.impl.forward(
        setup.layer, query, query[:, :1], query[:, :1], placeholder_cache, None, output=output
    )
    assert returned is output and torch.equal(output, torch.zeros_like(output))


def test_fused_output_quant_is_refused(device: str) -> None:
    setup = Model(device, num_heads=4, num_kv_heads=1, head_size=32).setup()
    query = torch.randn(2, 4, 32, dtype=torch.float16, device=device)
    with pytest.raises(NotImplementedError, match="output quantization"):
        setup.impl.forward(
            setup.layer,
            query,
            None,
            None,
            torch.tensor([]),
            None,
            output=torch.empty_like(query),
            output_scale=torch.tensor(1.0),
        )


class _RecordOps(TorchDispatchMode):
    """Records every tensor operation dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_build_runs_no_tensor_ops(route_env: pytest.MonkeyPatch, device: str) -> None:
    """The unified route's build() passes vLLM's tensors through: no allocation, no copy, no
    .item()/.cpu(). A tensor op of any kind (hence any device->host sync) would be recorded.
    (The grouped route's build launches a Triton kernel, which the interpreter runs through
    torch ops; test_gpu_build_never_syncs_or_allocates covers both routes on a GPU.)"""
    route_env.setenv(envs.ROUTE_ENV, "unified")
    model = Model(device)
    setup = model.setup()
    setup.builder.num_sms = SPLIT_NUM_SMS
    for requests in (MIXED, DECODES):
        batch = model.batch(requests, num_padded_requests=1)
        cm = common_metadata(batch, padded=True)
        with _RecordOps() as recorder:
            md = setup.builder.build(0, cm)
        assert recorder.ops == []
        assert md.query_start_loc is cm.query_start_loc and md.seq_lens is cm.seq_lens
        assert md.block_table is cm.block_table_tensor and md.slot_mapping is cm.slot_mapping
        assert md.workspace is setup.builder.workspace


@pytest.mark.gpu
def test_gpu_build_never_syncs_or_allocates(route: str, device: str) -> None:
    model = Model(device, **LLAMA_8B)
    setup = model.setup()
    # The third batch's prefill reaches the TMA prefill's minimum on sm_90 (1024 tokens at 32
    # heads): the unified route classifies it.
    for requests in (MIXED, DECODES, [(4100, 0), (1, 30)]):
        batch = model.batch(requests, num_padded_requests=2, num_padding_tokens=3)
        cm = common_metadata(batch, padded=True)
        setup.builder.build(0, cm)  # first call compiles the classifier
        torch.cuda.synchronize()
        # Python's cycle collector, running inside the build, could free an earlier test's
        # tensors and hide an allocation (an H200 run saw 4.5 KiB freed there), so it waits.
        gc.collect()
        gc.disable()
        allocated = torch.cuda.memory_allocated()
        torch.cuda.set_sync_debug_mode("error")  # any device->host sync raises
        try:
            setup.builder.build(0, cm)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            gc.enable()
        assert torch.cuda.memory_allocated() == allocated


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        ([(1, 9), (4, 30)], ((5, 2), (0, 0), (0, 0))),  # decodes and a spec-verify step
        ([(5, 0), (40, 300), (1, 9)], ((1, 1), (40, 1), (5, 1))),  # V2: prompt before extend
        ([(17, 0), (3, 0)], ((0, 0), (0, 0), (20, 2))),  # fresh prompts only, one short
        ([(20, 5)], ((0, 0), (20, 1), (0, 0))),  # a chunked-prefill continuation
    ],
)
def test_grouped_build_sizes_the_groups_present(
    requests: list,
    expected: tuple,
    route_env: pytest.MonkeyPatch,
    device: str,
) -> None:
    """The host-side (tokens, requests) of each group must be exactly what the device
    classifier will sort: an eager launch skips a group sized empty and sizes each grid from
    them (padded requests belong to no group)."""
    route_env.setenv(envs.ROUTE_ENV, "grouped")
    model = Model(device)
    setup = model.setup()
    batch = model.batch(requests, num_padded_requests=2)
    md = setup.builder.build(0, common_metadata(batch, padded=True))
    assert md.group_sizes == expected


def test_host_group_sizes_follow_the_classifier_rule() -> None:
    """The host's group sizes, on random batches (padding, decodes, verify lengths, extends,
    prefills, padded rows past num_reqs), against the rule written out."""
    rng = random.Random(0)
    for _ in range(500):
        num_reqs, num_padded = rng.randrange(40), rng.randrange(3)
        q_lens = [rng.choice([0, 1, 2, 5, 8, 9, 30, 500]) for _ in range(num_reqs + num_padded)]
        requests = [(q, rng.choice([0, 0, 3, 100])) for q in q_lens]  # (query, context)
        cm = types.SimpleNamespace(
            num_reqs=num_reqs,
            query_start_loc_cpu=torch.tensor([0, *itertools.accumulate(q_lens)]),
            seq_lens_cpu_upper_bound=torch.tensor([q + c for q, c in requests]),
        )
        real = requests[:num_reqs]
        decodes = [q for q, c in real if 0 < q <= MAX_DECODE_QUERY_LEN and c]
        extends = [q for q, c in real if q > MAX_DECODE_QUERY_LEN and c]
        prefills = [q for q, c in real if q and not c]
        expected = tuple((sum(g), len(g)) for g in (decodes, extends, prefills))
        assert plan_module._host_group_sizes(cm) == expected, real


def test_grouped_build_without_host_lengths_launches_every_group(
    route_env: pytest.MonkeyPatch, device: str
) -> None:
    route_env.setenv(envs.ROUTE_ENV, "grouped")
    model = Model(device)
    setup = model.setup()
    batch = model.batch([(1, 9), (4, 30)], num_padded_requests=2)
    cm = common_metadata(batch, padded=True)
    for upper_bound in (None, cm.seq_lens_cpu_upper_bound[:2]):  # absent, or not padded
        md = setup.builder.build(0, dataclasses.replace(cm, seq_lens_cpu_upper_bound=upper_bound))
        assert md.group_sizes is None


def test_grouped_build_under_adaptive_verification_launches_every_group(
    route_env: pytest.MonkeyPatch, device: str
) -> None:
    """vLLM 0.33's adaptive verification trims verify queries on the device only: the host's
    query_start_loc_cpu then spreads the same tokens evenly and misnames the groups. Here the
    host sees two 5-token verifies (decodes), the device a decode and a 9-token extend; with
    host flags the extend group would be skipped and its rows left unwritten."""
    route_env.setenv(envs.ROUTE_ENV, "grouped")
    route_env.setattr(plan_module, "adaptive_verification_enabled", lambda cfg: True)
    model = Model(device)
    setup = model.setup()
    assert not setup.builder.host_lengths_exact
    batch = model.batch([(1, 30), (9, 40)], num_padded_requests=1, seed=3)
    host_q_lens = [5, 5, 0]  # what the host believes: the same 10 tokens, evenly spread
    cm = dataclasses.replace(
        common_metadata(batch, padded=True),
        query_start_loc_cpu=torch.tensor([0, 5, 10, 10], dtype=torch.int32),
    )
    host_sizes = plan_module._host_group_sizes(cm)
    assert host_sizes is not None
    assert host_sizes[1] == (0, 0)  # no extend
    assert cm.query_start_loc_cpu.diff().tolist() == host_q_lens
    oracle = oracle_copy(batch)

    md = setup.builder.build(0, cm)
    assert md.group_sizes is None
    output = run_step(setup, batch, md)
    assert_matches(output, reference(setup, oracle), batch.num_actual_tokens)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the minimum grid decides (test_gpu_unified_...)"
)
def test_unified_route_runs_large_prefill_steps_through_the_tma_prefill(
    route_env: pytest.MonkeyPatch, device: str, spy: Spy
) -> None:
    """A unified-route step whose fresh prefills reach the builder's minimum is classified and
    its layers run the grouped launches, the prefill group on the TMA prefill; a smaller step
    stays on the unified launch. (Without a GPU the minimum is off, so the test sets it; the
    interpreter's TMA row has no minimum grid of its own.)"""
    route_env.setenv(envs.ROUTE_ENV, "unified")
    model = Model(device, head_size=32)
    setup = model.setup()
    tma_calls = spy(grouped_module, "tma_prefill_attention")
    unified_calls = spy(impl_module, "unified_attention")
    # MIXED's fresh prompt: 17 tokens; the 63-token continuation is an extend.
    for min_tokens, classified in ((17, True), (18, False)):
        setup.builder.tma_prefill_min_tokens = min_tokens
        batch = model.batch(MIXED, num_padded_requests=1, num_padding_tokens=2, seed=min_tokens)
        oracle = oracle_copy(batch)
        md = setup.builder.build(0, common_metadata(batch, padded=True))
        assert (md.request_groups is not None) == classified
        # (tokens, requests) of the decode, extend and prefill groups.
        assert md.group_sizes == (((7, 3), (63, 1), (17, 1)) if classified else None)
        output = run_step(setup, batch, md)
        assert_matches(output, reference(setup, oracle), batch.num_actual_tokens)
        assert (len(tma_calls), len(unified_calls)) == ((1, 0) if classified else (1, 1))


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="on a GPU the minimum grid alone keeps this small step unified, so the reason under "
    "test would not be the one deciding",
)
@pytest.mark.parametrize("reason", ["sliding_window", "capture", "kv_sharing"])
def test_unified_route_keeps_a_classified_step_where_the_tma_prefill_does_not_apply(
    reason: str, route_env: pytest.MonkeyPatch, device: str, spy: Spy
) -> None:
    """A layer with a score modifier, a CUDA-graph capture (whose graph replays other steps)
    and a layer reading another layer's cache run a classified step on the unified launch."""
    route_env.setenv(envs.ROUTE_ENV, "unified")
    model = Model(device, head_size=32)
    setup = model.setup(**({"sliding_window": 9} if reason == "sliding_window" else {}))
    setup.builder.tma_prefill_min_tokens = 1
    if reason == "capture":
        route_env.setattr(impl_module, "graph_capture_in_progress", lambda: True)
    if reason == "kv_sharing":
        setup.impl.kv_sharing_target_layer_name = "model.layers.0.self_attn.attn"
    grouped_calls = spy(impl_module, "grouped_attention")
    batch = model.batch(MIXED, num_padded_requests=1, seed=4)
    oracle = oracle_copy(batch)
    md = setup.builder.build(0, common_metadata(batch, padded=True))
    assert md.request_groups is not None
    output = run_step(setup, batch, md)
    features = {"sliding_window": 9} if reason == "sliding_window" else {}
    assert_matches(output, reference(setup, oracle, **features), batch.num_actual_tokens)
    assert grouped_calls == []


# ---------------------------------------------------------------------- precompile


def test_precompile_plan_covers_every_step_the_builder_plans(route: str, device: str) -> None:
    """Each step's launch-deciding facts (longest query, segment count, classified or not) are
    among the plan's step shapes: decode and spec-verify batches of every size that splits,
    padded ones, and prefill-shaped steps."""
    model = Model(device, **{**LLAMA_8B, "dtype": torch.float16})
    setup = model.setup()
    setup.builder.num_sms = 132  # an H100's split-KV choices
    plan = setup.builder.precompile_plan()
    shapes = step_shapes(plan, route)
    seen_splits = set()
    for num_reqs in range(1, 17):  # the test config's max_num_seqs
        for q_len, padding in ((1, 0), (3, 0), (8, 0), (1, 64), (20, 0)):
            requests = [(q_len, 5)] * num_reqs
            batch = model.batch(requests, num_padding_tokens=padding)
            md = setup.builder.build(0, common_metadata(batch, padded=True))
            classified = md.request_groups is not None
            shape = StepShape(min(md.max_query_len, MAX_DECODE_QUERY_LEN + 1), md.num_segments,
                              classified, narrow_split=md.narrow_split)  # fmt: skip
            assert shape in shapes, (requests, padding)
            seen_splits.add((md.num_segments, md.narrow_split))
    # One request at 8 KV heads is a narrow grid on 132 SMs, two or more a wide one.
    assert seen_splits == {(1, False), (8, False), (16, False), (32, False), (32, True)}
    assert set(plan.splits) == seen_splits | {(4, False)}  # 4: 17 to 32 requests


def test_precompile_runs_every_step_shape_under_compile_only(
    route: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """precompile_step_shapes hands `attend` one metadata per step shape, changed in its
    launch-deciding facts only, and all of it inside compile_only; a TMA shape carries the
    builder's request groups and a prefill group at the minimum, a split shape fits the
    workspace. (compile_only itself needs a GPU: test_gpu_precompile_...)"""
    model = Model(device)
    setup = model.setup()
    setup.builder.num_sms = 16
    # A TMA minimum, as on sm_90 (the builder has none on the CPU).
    plan = dataclasses.replace(setup.builder.precompile_plan(), tma_prefill_tokens=40)
    inside = []
    threads = []

    @contextlib.contextmanager
    def fake_compile_only(num_threads: int) -> Iterator[CompileCount]:
        threads.append(num_threads)
        inside.append(True)
        yield CompileCount()
        inside.append(False)

    classified_by_builder = []
    monkeypatch.setattr(precompile_module, "compile_only", fake_compile_only)
    monkeypatch.setattr(
        precompile_module, "classify_requests", lambda *a: classified_by_builder.append(inside)
    )
    batch = model.batch(MIXED, num_padded_requests=1)  # 87 tokens: more than a split holds
    md = setup.builder.build(0, common_metadata(batch, padded=True))
    seen: list[PortableAttentionMetadata] = []
    precompile_module.precompile_step_shapes(
        lambda shape_md: seen.append(shape_md) or None, md, plan
    )
    assert inside == [True, False] and len(classified_by_builder) == 1
    assert threads == [precompile_module.COMPILE_THREADS] and threads[0] >= 1
    assert len(seen) == len(step_shapes(plan, route))
    tma_shapes = [m for m in seen if m.group_sizes is not None]
    assert len(tma_shapes) == MAX_DECODE_QUERY_LEN + 1
    for m in seen:
        assert m.query_start_loc is md.query_start_loc and m.block_table is md.block_table
        if m.num_segments > 1:
            assert m.num_actual_tokens == md.workspace.max_tokens < md.num_actual_tokens
        else:
            assert m.num_actual_tokens == md.num_actual_tokens
        if m.group_sizes is not None:  # every group launches; the prefill reaches the TMA size
            tokens = m.num_actual_tokens
            assert m.group_sizes == ((m.max_query_len, 1), (tokens, 1), (40, 1))
            assert m.request_groups is plan.request_groups
        else:
            assert m.request_groups is (plan.request_groups if route == "grouped" else None)
    assert {(m.max_query_len, m.num_segments, m.narrow_split) for m in seen} >= {
        (q, s, narrow) for q in range(1, MAX_DECODE_QUERY_LEN + 1) for s, narrow in plan.splits
    }


def test_forward_precompiles_once_at_the_first_eager_step(
    route: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not without a plan (CPU builders have none), not in a capture, then once per layer; the
    step's output is unchanged."""
    model = Model(device)
    setup = model.setup()
    calls: list[PortableAttentionMetadata] = []
    monkeypatch.setattr(
        impl_module, "precompile_step_shapes", lambda attend, md, plan: calls.append(md)
    )
    steps = [(None, False), (setup.builder.precompile_plan(), True)]
    steps += [(setup.builder.precompile_plan(), False)] * 2
    for i, (plan, capturing) in enumerate(steps):
        monkeypatch.setattr(impl_module, "graph_capture_in_progress", lambda c=capturing: c)
        batch = model.batch(MIXED, seed=i)
        oracle = oracle_copy(batch)
        md = dataclasses.replace(
            setup.builder.build(0, common_metadata(batch, padded=False)), precompile=plan
        )
        output = run_step(setup, batch, md)
        assert_matches(output, reference(setup, oracle), batch.num_actual_tokens)
        assert len(calls) == (0, 0, 1, 1)[i]
    assert calls[0].max_query_len == max(q for q, _ in MIXED)


def _with_block_table_width(batch: PagedBatch, width: int) -> PagedBatch:
    """The batch with its block table as a view of a `width`-page table, as vLLM's runner
    keeps one persistent table (Triton specialises on its row stride)."""
    wide = torch.zeros(batch.block_table.shape[0], width, dtype=torch.int32,
                       device=batch.block_table.device)  # fmt: skip
    wide[:, : batch.block_table.shape[1]] = batch.block_table
    return dataclasses.replace(batch, block_table=wide)


@pytest.mark.gpu
def test_gpu_precompile_leaves_nothing_to_compile_for_later_steps(
    route: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a layer's first step (vLLM's warm-up shape: a 2-token prompt and a decode), no
    later step compiles a kernel: spec-verify tiles, split-KV segment counts, extends,
    prefills and (on sm_90) the TMA steps. Triton's in-memory caches are emptied first, so no
    earlier test can have compiled them; without the precompile the same steps do compile.
    With more than one core the precompile compiles on its thread pool (compile_only)."""
    model = Model(device, **LLAMA_8B)
    warmup = [(2, 0), (1, 20)]
    later = [
        [(1, 700)],  # 32 segments over a narrow grid
        [(3, 200), (1, 50), (5, 90)],  # spec-verify, 32 segments over a wide grid
        [(6, 90)] * 6,  # 16 segments
        [(8, 40)] * 8,  # 8 segments (64 tokens)
        [(1, 30)] * 10,  # padded past the split bound below: no split
        [(40, 100), (1, 30), (300, 0)],  # extend, decode, prefill
        [(4100, 0), (1, 30), (5, 70), (200, 64)],  # a TMA step on sm_90
        [(1100, 0), (1, 30), (1, 70)],  # a TMA step whose decodes take the decode tile
    ]
    compiled: list[str] = []
    monkeypatch.setattr(
        knobs.runtime, "jit_post_compile_hook", lambda **kw: compiled.append(kw["fn"].name)
    )
    # Each kernel looks Triton's compile up when its per-device caches are made (emptied below).
    compiling_threads: set[str] = set()
    real_compile = triton.compiler.compile

    def compile_on_record(*args: object, **kw: object) -> object:
        compiling_threads.add(threading.current_thread().name)
        return real_compile(*args, **kw)

    monkeypatch.setattr(triton.compiler, "compile", compile_on_record)

    def run_steps(precompile: bool) -> tuple[int, list[str]]:
        for _, _, fn in jit_kernels():
            fn.device_caches.clear()
        compiled.clear()
        setup = model.setup(precompile=precompile)
        for i, requests in enumerate([warmup, *later]):
            if i == 1:
                at_warmup = len(compiled)
            padding = 60 if requests == later[4] else 0
            batch = model.batch(requests, num_padding_tokens=padding, seed=i)
            batch = _with_block_table_width(batch, 512)
            oracle = oracle_copy(batch)
            md = setup.builder.build(0, common_metadata(batch, padded=True))
            output = run_step(setup, batch, md)
            assert_matches(output, reference(setup, oracle), batch.num_actual_tokens)
        return at_warmup, compiled[at_warmup:]

    at_warmup, after_warmup = run_steps(precompile=True)
    assert at_warmup > 5 and after_warmup == []
    pool = compile_threads(precompile_module.COMPILE_THREADS) > 1
    assert pool == any(name.startswith("portable-attn-compile") for name in compiling_threads)
    _, without = run_steps(precompile=False)
    assert "attention_kernel" in without


def test_adaptive_verification_is_read_from_the_speculative_config() -> None:
    from types import SimpleNamespace

    assert not _compat.adaptive_verification_enabled(make_vllm_config(16))  # no spec decode
    for enabled in (False, True):
        cfg = SimpleNamespace(
            speculative_config=SimpleNamespace(enable_adaptive_verification=enabled)
        )
        assert _compat.adaptive_verification_enabled(cfg) is enabled
    # vLLM 0.26's SpeculativeConfig has no such field.
    assert not _compat.adaptive_verification_enabled(
        SimpleNamespace(speculative_config=SimpleNamespace())
    )


@pytest.mark.skipif(
    _compat.KVCacheLayout is None,
    reason="this vLLM allocates the KV cache through the backend's stride order "
    "(tests/test_registration.py checks it)",
)
@pytest.mark.parametrize(
    "layout_name", [] if _compat.KVCacheLayout is None else [m.name for m in _compat.KVCacheLayout]
)
def test_every_vllm_kv_cache_layout(layout_name: str, route: str, device: str) -> None:
    """vLLM 0.33 picks one model-wide KVCacheLayout from every backend's
    supported_kv_cache_layouts(); ours declares none (any layout), so the impl must handle
    each. The cache here is allocated by vLLM's own code for two layers sharing one buffer
    (block-outermost layouts interleave them); ours is the second, the first is NaN-filled."""
    from vllm.v1.kv_cache_interface import (
        KVCacheTensor,
        compute_layout_strides,
        create_kv_cache_views,
    )

    assert PortableAttentionBackend.supported_kv_cache_layouts() is None
    layout = _compat.KVCacheLayout[layout_name]
    model = Model(device)
    setup = model.setup()
    batch = model.batch(
        [(1, 16), (5, 1), (17, 0), (20, 40)], num_padded_requests=1, num_padding_tokens=2, seed=9
    )
    num_blocks = batch.kv_cache.shape[0]
    layers = ["model.layers.1.self_attn.attn", LAYER]
    layer_stride, block_stride, *_ = compute_layout_strides(
        setup.spec, num_blocks, len(layers), layout
    )
    size = len(layers) * num_blocks * setup.spec.page_size_bytes
    raw = torch.zeros(size, dtype=torch.int8, device=device)
    placement = KVCacheTensor(
        size=size, layers=layers, layer_stride=layer_stride, block_stride=block_stride
    )
    other, kv_cache = create_kv_cache_views(raw, setup.spec, num_blocks, layout, placement)
    assert kv_cache.shape == batch.kv_cache.shape and kv_cache.dtype == batch.kv_cache.dtype
    other.fill_(float("nan"))
    kv_cache.copy_(batch.kv_cache)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(batch.head_size, dim=-1)
    batch = dataclasses.replace(
        batch, kv_cache=kv_cache, key_cache=key_cache, value_cache=value_cache
    )
    oracle = oracle_copy(batch)

    md = setup.builder.build(0, common_metadata(batch, padded=True))
    output = run_step(setup, batch, md)

    check_cache_write(batch, oracle)
    assert other.isnan().all(), "the other layer's cache was written"
    assert_matches(output, reference(setup, oracle), batch.num_actual_tokens)


def test_kv_sharing_layer_reads_the_cache_not_its_own_kv(route: str, device: str) -> None:
    """A layer sharing another layer's cache (kv_sharing_target_layer_name) gets key/value
    that were never written to the cache; attention must come from the cache alone."""
    model = Model(device, head_size=32, dtype=torch.float32)
    setup = model.setup()
    setup.impl.kv_sharing_target_layer_name = "model.layers.0.self_attn.attn"
    batch = model.batch(MIXED, num_padded_requests=1, num_padding_tokens=2, seed=9)
    oracle = oracle_copy(batch)
    batch.kv_cache.copy_(oracle.kv_cache)  # the target layer wrote this step's K/V already
    md = setup.builder.build(0, common_metadata(batch, padded=True))
    output = torch.full_like(batch.query, float("nan"))
    unrelated_k, unrelated_v = torch.randn_like(batch.key), torch.randn_like(batch.value)
    setup.impl.forward(
        setup.layer, batch.query, unrelated_k, unrelated_v, batch.kv_cache, md, output=output
    )
    assert_matches(output, reference(setup, oracle), batch.num_actual_tokens)


@pytest.mark.parametrize(
    ("requests", "narrow"),
    [([(1, 50)], True), ([(3, 50)], True), ([(1, 50)] * 2, False), ([(20, 5)], False)],
)
def test_builder_marks_narrow_split_grids_and_the_impl_passes_it_on(
    route: str,
    device: str,
    monkeypatch: pytest.MonkeyPatch,
    requests: list[tuple[int, int]],
    narrow: bool,
) -> None:
    """On 132 SMs at 8 KV heads a split step of one request is narrow, of two wide; an unsplit
    (prefill-shaped) step never is. The forward hands the launcher exactly that (the launch
    itself is recorded, not run: the kernel tests run both rows)."""
    model = Model(device, **{**LLAMA_8B, "dtype": torch.float16})
    setup = model.setup()
    setup.builder.num_sms = 132
    calls: list[dict] = []
    launcher = "grouped_attention" if route == "grouped" else "unified_attention"
    monkeypatch.setattr(impl_module, launcher, lambda *args, **kwargs: calls.append(kwargs))
    batch = model.batch(requests)
    md = setup.builder.build(0, common_metadata(batch, padded=True))
    assert md.narrow_split == narrow and (md.num_segments > 1 or not narrow)
    run_step(setup, batch, md)
    assert [c["narrow_split"] for c in calls] == [narrow]


def test_segment_choice_depends_on_padded_counts_only(device: str) -> None:
    """Two steps with the same padded shape but different lengths get the same plan."""
    model = Model(device)
    setup = model.setup()
    setup.builder.num_sms = SPLIT_NUM_SMS
    a = model.batch([(1, 5), (1, 300), (1, 2)], num_padding_tokens=5)
    b = model.batch([(1, 900), (1, 1), (1, 64)], num_padding_tokens=5)
    plans = [setup.builder.build(0, common_metadata(x, padded=True)).num_segments for x in (a, b)]
    assert plans[0] == plans[1] > 1


def test_builder_reads_head_counts_without_model_config(device: str) -> None:
    setup = Model(device, num_heads=12, num_kv_heads=3).setup()
    assert setup.cfg.model_config is None
    assert setup.builder.num_heads == 12 and setup.builder.num_kv_heads == 3
    assert setup.builder.workspace.partial_max.shape[1] == 12
    assert (
        PortableAttentionMetadataBuilder.get_cudagraph_support(setup.cfg, setup.spec)
        is AttentionCGSupport.ALWAYS
    )


@pytest.fixture
def plan_log() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("vllm.portable_attn.plan")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_unknown_query_heads_disable_split_with_a_warning(
    device: str, plan_log: list[logging.LogRecord]
) -> None:
    model = Model(device)
    setup = model.setup(register_layer=False)
    assert setup.builder.num_heads is None and setup.builder.workspace is None
    assert any("split-KV decode is disabled" in r.getMessage() for r in plan_log)
    setup.builder.num_sms = SPLIT_NUM_SMS
    batch = model.batch(DECODES)
    assert setup.builder.build(0, common_metadata(batch, padded=False)).num_segments == 1


def test_builder_rejects_cascade_and_non_causal(device: str) -> None:
    model = Model(device, num_heads=4, num_kv_heads=1, head_size=32)
    setup = model.setup()
    batch = model.batch([(3, 4)])
    cm = common_metadata(batch, padded=False)
    with pytest.raises(ValueError, match="cascade"):
        setup.builder.build(16, cm)
    with pytest.raises(ValueError, match="non-causal"):
        setup.builder.build(0, dataclasses.replace(cm, causal=False))


# ------------------------------------------------------------------- impl construction

IMPL_ARGS = (8, 64, 0.125, 2, None, None, "auto", None, AttentionType.DECODER, None)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({8: AttentionType.ENCODER}, NotImplementedError, "decoder self-attention only"),
        ({8: AttentionType.ENCODER_ONLY}, NotImplementedError, "decoder self-attention only"),
        ({8: AttentionType.ENCODER_DECODER}, NotImplementedError, "decoder self-attention"),
        ({6: "int8_per_token_head"}, ValueError, "'int8_per_token_head' is not supported"),
        ({3: 3}, ValueError, "not a multiple of num_kv_heads"),
        ({5: 0}, ValueError, "sliding_window must be positive"),
        ({4: [0.5] * 7}, ValueError, "7 ALiBi slopes for 8 heads"),
        ({"sinks": torch.zeros(4)}, ValueError, r"sinks must have shape \(8,\)"),
        ({"use_alibi_sqrt": True}, ValueError, "use_alibi_sqrt=True"),
        ({"chunk_lookback": 128}, ValueError, "chunk_lookback=128"),
        ({"block_m": 64}, ValueError, r"does not support the attention arguments \['block_m'\]"),
    ],
    ids=[
        "encoder",
        "encoder_only",
        "cross",
        "int8_kv",
        "heads",
        "window0",
        "alibi",
        "sinks",
        "alibi_sqrt",
        "chunk_lookback",
        "unknown_kwarg",
    ],
)
def test_impl_rejects_unsupported(change: dict, error: type, match: str) -> None:
    args = list(IMPL_ARGS)
    kwargs = {}
    for key, value in change.items():
        if isinstance(key, int):
            args[key] = value
        else:
            kwargs[key] = value
    with pytest.raises(error, match=match):
        PortableAttentionImpl(*args, **kwargs)


@pytest.mark.parametrize(
    "kv_cache_dtype, fp8",
    [
        ("auto", None),
        ("float16", None),
        ("fp8", current_platform.fp8_dtype()),
        ("fp8_e4m3", current_platform.fp8_dtype()),
        ("fp8_e5m2", torch.float8_e5m2),
    ],
    ids=["auto", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"],
)
def test_impl_views_fp8_caches_as_their_type(kv_cache_dtype: str, fp8: torch.dtype | None) -> None:
    args = list(IMPL_ARGS)
    args[6] = kv_cache_dtype
    assert PortableAttentionImpl(*args).fp8_dtype == fp8


def test_impl_accepts_vllm_defaults_for_optional_args() -> None:
    impl = PortableAttentionImpl(*IMPL_ARGS, sinks=None, use_alibi_sqrt=False, chunk_lookback=-1)
    assert impl.sliding_window is None and impl.logits_soft_cap is None and impl.sinks is None
    # vLLM's "no softcap" is 0 as well as None.
    assert PortableAttentionImpl(*IMPL_ARGS[:7], 0.0, *IMPL_ARGS[8:]).logits_soft_cap is None


# ------------------------------------------------------------------------------- routes


@pytest.fixture
def route_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    envs.reset_cache()
    yield monkeypatch
    monkeypatch.undo()
    envs.reset_cache()


@pytest.mark.parametrize(
    "value, hip, route",
    [
        (None, None, "unified"),
        ("", None, "unified"),
        ("auto", None, "unified"),
        ("auto", "6.4", "grouped"),
        (None, "6.4", "grouped"),
        (" Unified ", "6.4", "unified"),
        ("GROUPED", None, "grouped"),
    ],
)
def test_route_parsing(route_env: pytest.MonkeyPatch, value, hip, route: str) -> None:
    if value is None:
        route_env.delenv(envs.ROUTE_ENV, raising=False)
    else:
        route_env.setenv(envs.ROUTE_ENV, value)
    route_env.setattr(torch.version, "hip", hip)
    assert envs.get_route() == route


def test_route_rejects_bad_value(route_env: pytest.MonkeyPatch) -> None:
    route_env.setenv(envs.ROUTE_ENV, "fastest")
    with pytest.raises(ValueError, match="valid values: auto, unified, grouped"):
        envs.get_route()


@pytest.mark.parametrize("value, hip", [("grouped", None), ("auto", "6.4"), ("unified", "6.4")])
def test_builder_follows_the_route(
    route_env: pytest.MonkeyPatch, value: str, hip: str | None, device: str
) -> None:
    route_env.setenv(envs.ROUTE_ENV, value)
    route_env.setattr(torch.version, "hip", hip)
    setup = Model(device, num_heads=4, num_kv_heads=1, head_size=32).setup()
    expected = "unified" if value == "unified" else "grouped"
    assert setup.builder.route == expected
    # Both routes hold the classifier's buffers, sized for max_num_seqs (16 in
    # make_vllm_config); only the grouped route classifies a plain mixed step.
    assert setup.builder.request_groups.seq_order.shape[0] == 16
    batch = Model(device, num_heads=4, num_kv_heads=1, head_size=32).batch(MIXED)
    md = setup.builder.build(0, common_metadata(batch, padded=False))
    assert (md.request_groups is not None) == (expected == "grouped")
