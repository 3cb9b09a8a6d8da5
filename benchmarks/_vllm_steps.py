"""One attention layer of ours, driven step by step the way vLLM's model runner drives it.

No engine: vLLM's real ``VllmConfig``, ``FullAttentionSpec`` and ``CommonAttentionMetadata``, our
impl and metadata builder, and a stand-in for vLLM's ``Attention`` layer registered in the static
forward context (where the builder finds the query-head count). This is the construction
tests/test_backend.py uses; it lives here because benchmarks do not import from tests/.

Per-step tensors live in persistent, runner-style buffers (sized by ``max_num_seqs`` /
``max_num_batched_tokens``) and reach the builder as slices, with host copies of the lengths, as
vLLM hands them over. Importing this module imports vLLM, torch and Triton: on a CPU host set
``TRITON_INTERPRET=1`` before importing it.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import _common as C
import torch
from vllm.config import CacheConfig, DeviceConfig, SchedulerConfig, VllmConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_portable_attn import envs
from vllm_portable_attn.backend import PortableAttentionBackend
from vllm_portable_attn.impl import PortableAttentionImpl
from vllm_portable_attn.plan import PortableAttentionMetadata, PortableAttentionMetadataBuilder

LAYER_NAME = "model.layers.0.self_attn.attn"


@dataclass(frozen=True)
class Step(C.BatchLengths):
    """One scheduler step: per request, its new tokens (``q_lens``) and its total length
    (``seq_lens`` = cached context + new tokens), in the runner's batch order."""

    name: str
    q_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]

    def other_lengths(self, rng: random.Random, max_jitter: int) -> Step:
        """The same composition with other lengths and alignments (same launch shapes):
        requests with context lose 1..max_jitter context tokens, fresh prompts 1..max_jitter
        prompt tokens (at least one is kept). Never needs more KV blocks than ``self``."""
        q_lens, seq_lens = [], []
        for q, s in zip(self.q_lens, self.seq_lens, strict=True):
            j = rng.randint(1, max_jitter)
            if s == q:
                q = s = max(1, q - j)
            else:
                s = max(q + 1, s - j)
            q_lens.append(q)
            seq_lens.append(s)
        return Step(self.name + "~", tuple(q_lens), tuple(seq_lens))


def decode_step(batch: int, ctx: int) -> Step:
    """``batch`` single-token decodes, each over ``ctx`` keys (its new token included)."""
    return Step(f"decode_b{batch}_ctx{C.count_label(ctx)}", (1,) * batch, (ctx,) * batch)


def mixed_step(n_prefill: int, prefill_len: int, n_decode: int, decode_ctx: int) -> Step:
    """Fresh prompts and decodes in one step, in Model Runner V2's order (decodes first)."""
    q = (1,) * n_decode + (prefill_len,) * n_prefill
    s = (decode_ctx,) * n_decode + (prefill_len,) * n_prefill
    name = f"mixed_{n_prefill}p{C.count_label(prefill_len)}_{n_decode}d{C.count_label(decode_ctx)}"
    return Step(name, q, s)


@dataclass(frozen=True)
class Geometry:
    """Attention shape of the layer (defaults: Llama-3.1-8B, bf16, blocks of 16)."""

    num_heads: int = 32
    num_kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16
    dtype_name: str = "bfloat16"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)


class FakeAttentionLayer(AttentionLayerBase):
    """What vLLM's Attention layer offers our impl and builder (unquantized cache), nothing more."""

    def __init__(self, impl: PortableAttentionImpl, spec: FullAttentionSpec, device: str) -> None:
        self.impl = impl
        self.layer_name = LAYER_NAME
        self._spec = spec
        for name in ("_q_scale", "_k_scale", "_v_scale"):
            setattr(self, name, torch.tensor(1.0, dtype=torch.float32, device=device))
        self._q_scale_float = self._k_scale_float = self._v_scale_float = 1.0

    def get_attn_backend(self) -> type[PortableAttentionBackend]:
        return PortableAttentionBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> FullAttentionSpec:
        return self._spec


class RunnerInputs:
    """The runner's persistent per-step buffers, one KV cache and the layer's Q/K/V/output.

    Shared by every layer built on it (one per route), so the KV cache exists once.
    """

    def __init__(
        self,
        geo: Geometry,
        device: str,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_blocks: int,
        seed: int = 0,
    ) -> None:
        self.geo, self.device = geo, device
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        pin = device != "cpu" and torch.cuda.is_available()
        i32 = dict(dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(max_num_seqs + 1, **i32)
        self.seq_lens = torch.zeros(max_num_seqs, **i32)
        self.block_table = torch.zeros(
            max_num_seqs, math.ceil(max_model_len / geo.block_size), **i32
        )
        self.slot_mapping = torch.full(
            (max_num_batched_tokens,), -1, dtype=torch.int64, device=device
        )
        self.query_start_loc_cpu = torch.zeros(max_num_seqs + 1, dtype=torch.int32, pin_memory=pin)
        self.seq_lens_cpu = torch.zeros(max_num_seqs, dtype=torch.int32, pin_memory=pin)

        gen = torch.Generator(device=device).manual_seed(seed)
        d, dt = geo.head_size, geo.dtype
        # vLLM's NHD cache: physical [blocks, block_size, kv_heads, 2 * head_size], K then V,
        # seen through the logical [blocks, kv_heads, block_size, 2 * head_size] view.
        physical = torch.empty(
            (num_blocks, geo.block_size, geo.num_kv_heads, 2 * d), dtype=dt, device=device
        )
        physical.normal_(generator=gen)
        self.kv_cache = physical.permute(0, 2, 1, 3)
        tokens = max_num_batched_tokens

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, dtype=dt, device=device, generator=gen)

        self.query = randn(tokens, geo.num_heads, d)
        self.key = randn(tokens, geo.num_kv_heads, d)
        self.value = randn(tokens, geo.num_kv_heads, d)
        self.output = torch.empty_like(self.query)

    def load(self, step: Step) -> CommonAttentionMetadata:
        """Write ``step`` into the persistent buffers (as the runner does before building) and
        return vLLM's metadata over slices of them. Not for timed regions: it copies to the GPU.
        """
        bs, n = self.geo.block_size, step.num_reqs
        if n > self.max_num_seqs or step.num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"{step.name} exceeds max_num_seqs / max_num_batched_tokens")
        if step.max_seq_len > self.max_model_len:
            raise ValueError(f"{step.name} exceeds max_model_len {self.max_model_len}")
        if step.num_blocks(bs) + 1 > self.num_blocks:
            raise ValueError(f"{step.name} needs more than {self.num_blocks - 1} KV blocks")
        starts = [0]
        for q in step.q_lens:
            starts.append(starts[-1] + q)
        table = torch.zeros(n, self.block_table.shape[1], dtype=torch.int32)
        slots: list[torch.Tensor] = []
        next_block = 1  # block 0 is vLLM's reserved null block
        for r, (q, s) in enumerate(zip(step.q_lens, step.seq_lens, strict=True)):
            nb = math.ceil(s / bs)
            table[r, :nb] = torch.arange(next_block, next_block + nb, dtype=torch.int32)
            next_block += nb
            pos = torch.arange(s - q, s)
            slots.append(table[r, pos // bs].long() * bs + pos % bs)
        self.query_start_loc_cpu[: n + 1] = torch.tensor(starts, dtype=torch.int32)
        self.seq_lens_cpu[:n] = torch.tensor(step.seq_lens, dtype=torch.int32)
        self.query_start_loc[: n + 1].copy_(self.query_start_loc_cpu[: n + 1])
        self.seq_lens[:n].copy_(self.seq_lens_cpu[:n])
        self.block_table[:n].copy_(table)
        self.slot_mapping[: step.num_tokens].copy_(torch.cat(slots))
        if self.device != "cpu":
            torch.cuda.synchronize()
        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc[: n + 1],
            query_start_loc_cpu=self.query_start_loc_cpu[: n + 1],
            seq_lens=self.seq_lens[:n],
            num_reqs=n,
            num_actual_tokens=step.num_tokens,
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            block_table_tensor=self.block_table[:n],
            slot_mapping=self.slot_mapping[: step.num_tokens],
            seq_lens_cpu_upper_bound=self.seq_lens_cpu[:n],
        )


class PortableLayer:
    """Our impl, builder and a stand-in layer for one route, in vLLM's construction order
    (layers at model init, then the KV-cache group's builder)."""

    def __init__(self, inputs: RunnerInputs, route: envs.Route) -> None:
        geo, device = inputs.geo, inputs.device
        self.inputs = inputs
        self.route = route
        previous = os.environ.get(envs.ROUTE_ENV)
        os.environ[envs.ROUTE_ENV] = route
        envs.reset_cache()
        try:
            # As tests/test_backend.py: model_config=None, and a "cpu" DeviceConfig, which the
            # builder does not read (it gets the device below) and which needs no GPU probing.
            self.cfg = VllmConfig(
                device_config=DeviceConfig(device="cpu"),
                cache_config=CacheConfig(block_size=geo.block_size),
                scheduler_config=SchedulerConfig.default_factory(
                    max_num_seqs=inputs.max_num_seqs,
                    max_num_batched_tokens=inputs.max_num_batched_tokens,
                ),
            )
            self.spec = FullAttentionSpec(
                block_size=geo.block_size,
                num_kv_heads=geo.num_kv_heads,
                head_size=geo.head_size,
                dtype=geo.dtype,
            )
            impl_cls = PortableAttentionBackend.get_impl_cls()
            self.impl: PortableAttentionImpl = impl_cls(
                geo.num_heads, geo.head_size, geo.head_size**-0.5, geo.num_kv_heads,
                None, None, "auto", None, AttentionType.DECODER, None,
            )  # fmt: skip
            self.layer = FakeAttentionLayer(self.impl, self.spec, device)
            self.cfg.compilation_config.static_forward_context[LAYER_NAME] = self.layer
            builder_cls = PortableAttentionBackend.get_builder_cls()
            self.builder: PortableAttentionMetadataBuilder = builder_cls(
                self.spec, [LAYER_NAME], self.cfg, torch.device(device)
            )
        finally:
            if previous is None:
                os.environ.pop(envs.ROUTE_ENV, None)
            else:
                os.environ[envs.ROUTE_ENV] = previous
            envs.reset_cache()
        if self.builder.route != route:
            raise RuntimeError(f"builder chose route {self.builder.route}, not {route}")

    def build(self, cm: CommonAttentionMetadata) -> PortableAttentionMetadata:
        """What vLLM calls once per step and KV-cache group."""
        return self.builder.build(0, cm)

    def kv_cache_update(self, md: PortableAttentionMetadata) -> None:
        """vllm::unified_kv_cache_update for this layer: the step's K/V into the cache."""
        inp, n = self.inputs, md.num_actual_tokens
        self.impl.do_kv_cache_update(
            self.layer, inp.key[:n], inp.value[:n], inp.kv_cache, md.slot_mapping
        )

    def forward(self, md: PortableAttentionMetadata) -> torch.Tensor:
        """vllm::unified_attention_with_output for this layer."""
        inp, n = self.inputs, md.num_actual_tokens
        return self.impl.forward(
            self.layer, inp.query[:n], inp.key[:n], inp.value[:n], inp.kv_cache, md,
            output=inp.output[:n],
        )  # fmt: skip
