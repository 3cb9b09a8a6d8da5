"""The per-step plan: vLLM's CommonAttentionMetadata turned into what the kernels need.

The builder runs once per step and KV-cache group; every layer of the group then runs the same
plan. It obeys the rules of full CUDA graphs (the builder declares ``ALWAYS``):

* no device->host synchronisation: only Python ints vLLM already has on the host are read;
* no per-step allocation: tensors are the runner's persistent buffers, passed through, plus the
  split-KV workspace this builder allocates once;
* every Python scalar that shapes a launch (the segment count) depends only on the padded token
  count, the padded request count and ``max_query_len``, so it is fixed per captured graph.

Because a graph replays the launch it captured, a replayed step may run with a segment count
that ``build`` would not have chosen for that step; the kernels are correct for any segment
count and any query lengths, so this costs speed at most, never correctness.

Routes (``PORTABLE_ATTN_ROUTE``, see envs.py):

* ``unified``: one launch over the whole mixed batch, in vLLM's batch order. The exception is
  an eager step whose fresh prefills hold at least ``tma_prefill_min_tokens`` tokens on a GPU
  with the TMA prefill (sm_90): ``build`` classifies it as the grouped route does, and layers
  where that kernel applies run the step through the grouped launches, so its prefills take the
  TMA prefill (H200, 8k prompt: 1185 us against the unified kernel's 1443; NOTES.md).
* ``grouped``: ``build`` launches the request classifier, which sorts this step's requests into
  decode / extend / prefill groups on the device (from each request's own lengths, never from
  its position: vLLM's V2 runner may put a short fresh prompt before a long extend) into
  buffers this builder owns; every layer then runs per-group kernels over that order. The
  classifier runs eagerly in ``build`` on every step, also when a full CUDA graph is replayed
  afterwards, so the order always matches the step's data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from vllm_portable_attn import envs
from vllm_portable_attn._compat import (
    AttentionCGSupport,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionSpec,
    CommonAttentionMetadata,
    VllmConfig,
    adaptive_verification_enabled,
    get_logger,
    num_attention_heads_of_layers,
)
from vllm_portable_attn.kernels import (
    MAX_DECODE_QUERY_LEN,
    MAX_SEGMENTS,
    MAX_SPLIT_TOKENS,
    GroupSizes,
    RequestGroups,
    SplitKVWorkspace,
    choose_split,
    classify_requests,
    device_num_sms,
    group_sizes,
)
from vllm_portable_attn.kernels.configs import (
    TMA_PREFILL_HEAD_SIZES,
    config_table_name,
    tma_prefill_min_tokens,
)
from vllm_portable_attn.precompile import PrecompilePlan

logger = get_logger(__name__)


@dataclass
class PortableAttentionMetadata(AttentionMetadata):
    """Everything one attention call needs; shared by all layers of a KV-cache group.

    Tensors are views of vLLM's persistent input buffers (stable addresses under CUDA graphs).
    """

    route: envs.Route
    num_actual_tokens: int  # padded in FULL-graph mode; rows past it are not computed
    max_query_len: int
    max_seq_len: int  # an upper bound on every seq_len
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32, context + new tokens; 0 for padded requests
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, in kernel-block units
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 for padded tokens
    num_segments: int  # split-KV segments per sequence; 1 = no split
    workspace: SplitKVWorkspace | None  # set whenever this builder can split
    # A split over few (request, KV head) pairs: its launches read the *_split_narrow rows.
    narrow_split: bool
    # This step's classification: every step on the grouped route; on the unified route only
    # a step classified for the TMA prefill (see the module docstring), else None.
    request_groups: RequestGroups | None
    # Classified steps: (tokens, requests) of the decode, extend and prefill groups, from
    # host-side lengths; None when unknown. They skip empty groups and size each group's grid,
    # so only eager launches may use them (PortableAttentionImpl.forward).
    group_sizes: GroupSizes | None = None
    # The builder's precompile plan (precompile.py): each layer's first eager step compiles
    # every launch its later steps can take. None where nothing is compiled (no GPU).
    precompile: PrecompilePlan | None = None


def _gpu_description(device: torch.device) -> str:
    """A GPU's name and architecture, for the start-up log."""
    props = torch.cuda.get_device_properties(device)
    arch = getattr(props, "gcnArchName", "") or f"sm_{props.major}{props.minor}"
    return f"{props.name} ({arch})"


class PortableAttentionMetadataBuilder(AttentionMetadataBuilder[PortableAttentionMetadata]):
    """Builds :class:`PortableAttentionMetadata` once per step.

    Head counts come from the KV-cache spec and the layers, never from ``model_config`` alone,
    so the builder also works with ``VllmConfig(model_config=None)`` (unit tests, tools).

    Where the query-head count comes from, and why: the split-KV workspace is sized by it, and
    must exist before the first CUDA-graph capture, so it cannot be allocated lazily in the
    impl. The spec knows only KV heads. The layers of this group (registered in the static
    forward context when the model is built, before any builder) know their exact per-rank
    count, which is also right for models whose layers differ in head count; ``model_config``
    is the fallback. With neither (a bare config in a test or tool), split-KV is disabled for
    this builder, with a warning: every batch then runs unsplit, which is correct but slower
    for small decode batches.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.route: envs.Route = envs.get_route()
        self.num_kv_heads: int = kv_cache_spec.num_kv_heads
        self.head_size: int = kv_cache_spec.head_size
        head_size_v = getattr(kv_cache_spec, "head_size_v", self.head_size)
        if head_size_v != self.head_size:
            raise ValueError(
                f"K and V head sizes differ ({self.head_size} vs {head_size_v}); "
                "vllm_portable_attn supports equal head sizes only"
            )
        self.num_heads: int | None = self._resolve_num_heads(vllm_config, layer_names)
        # Public so tests (and benchmarks) can model a GPU of another size.
        self.num_sms: int = device_num_sms(torch.device(device))

        self.workspace: SplitKVWorkspace | None = None
        if self.num_heads is None:
            logger.warning_once(
                "vllm_portable_attn: no attention layer or model config gives the query-head "
                "count for layers %s; split-KV decode is disabled for them",
                ", ".join(layer_names),
            )
        else:
            # Persistent, so its addresses are fixed under CUDA graphs. Batches larger than
            # MAX_SPLIT_TOKENS never split (choose_num_segments returns 1), so that bounds it.
            self.workspace = SplitKVWorkspace.allocate(
                max_tokens=MAX_SPLIT_TOKENS,
                num_heads=self.num_heads,
                head_size=self.head_size,
                max_segments=MAX_SEGMENTS,
                device=device,
            )
        # vLLM 0.33's adaptive verification trims verify queries on the device only, so the
        # host's query lengths are then upper bounds and cannot tell which groups are empty.
        self.host_lengths_exact: bool = not adaptive_verification_enabled(vllm_config)
        # Unified route: fewest fresh-prefill tokens that send a step through the TMA prefill;
        # None where it cannot run (not sm_90, or a dtype / head size outside its scope).
        # Public so tests can turn it on without a GPU.
        self.tma_prefill_min_tokens: int | None = None
        if self.route == "unified" and torch.device(device).type == "cuda" and self.num_heads:
            if self._tma_prefill_in_scope(kv_cache_spec):
                self.tma_prefill_min_tokens = tma_prefill_min_tokens(self.num_heads)
        # Small (a few ints per request), so both routes keep one. vLLM never schedules more
        # than max_num_seqs requests, padded ones included; a larger batch makes
        # classify_requests raise rather than overflow.
        self.request_groups: RequestGroups = RequestGroups.allocate(
            vllm_config.scheduler_config.max_num_seqs, device
        )
        # Public so tests can turn it off (or on, for a builder made on the CPU).
        self.precompile: PrecompilePlan | None = None
        if torch.device(device).type == "cuda":
            self.precompile = self.precompile_plan()
        logger.info_once(
            "vllm_portable_attn: route=%s, split-KV workspace %s (query heads %s, kv heads %d, "
            "head size %d, %d SMs)",
            self.route,
            "disabled"
            if self.workspace is None
            else f"{MAX_SPLIT_TOKENS} tokens x {MAX_SEGMENTS} segments",
            self.num_heads,
            self.num_kv_heads,
            self.head_size,
            self.num_sms,
        )
        if torch.device(device).type == "cuda":
            # Which per-architecture rows of kernels/configs.py's launch table this GPU gets.
            logger.info_once(
                "vllm_portable_attn: launch-config table '%s' chosen for %s",
                config_table_name(),
                _gpu_description(torch.device(device)),
            )
            min_tokens = self._tma_prefill_tokens()
            if min_tokens is not None:
                logger.info_once(
                    "vllm_portable_attn: eager steps with at least %d fresh-prefill tokens run "
                    "them through the TMA prefill%s (plain causal attention, 16-bit K/V, head "
                    "size %s)",
                    min_tokens,
                    " and the grouped launches" if self.route == "unified" else "",
                    "/".join(map(str, TMA_PREFILL_HEAD_SIZES)),
                )

    def precompile_plan(self) -> PrecompilePlan:
        """The launches this builder's steps can take, for precompile.py."""
        splits = {(1, False)}
        if self.workspace is not None:
            # The choice depends on the request count only, once a batch may split at all.
            splits |= {
                choose_split(n, n, 1, self.num_kv_heads, self.num_sms)
                for n in range(1, self.workspace.max_tokens + 1)
            }
        return PrecompilePlan(
            splits=tuple(sorted(splits)),
            tma_prefill_tokens=self._tma_prefill_tokens(),
            request_groups=self.request_groups,
        )

    def _tma_prefill_tokens(self) -> int | None:
        """Fewest fresh-prefill tokens of a step that takes the TMA prefill on this route, where
        one can (the grouped route asks per layer, the unified route decided at start)."""
        if self.route == "grouped" and self.num_heads:
            return tma_prefill_min_tokens(self.num_heads)
        return self.tma_prefill_min_tokens

    @staticmethod
    def _tma_prefill_in_scope(kv_cache_spec: AttentionSpec) -> bool:
        """Whether this group's cache can feed the TMA prefill: 16-bit (not fp8, whose
        prefills must read the quantised cache) at one of its head sizes."""
        return (
            kv_cache_spec.dtype in (torch.float16, torch.bfloat16)
            and kv_cache_spec.head_size in TMA_PREFILL_HEAD_SIZES
        )

    @staticmethod
    def _resolve_num_heads(vllm_config: VllmConfig, layer_names: list[str]) -> int | None:
        """Per-rank query heads of this group's layers (see the class docstring)."""
        num_heads = num_attention_heads_of_layers(vllm_config, layer_names)
        if num_heads is None and vllm_config.model_config is not None:
            num_heads = vllm_config.model_config.get_num_attention_heads(
                vllm_config.parallel_config
            )
        return num_heads

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> PortableAttentionMetadata:
        """Pass the runner's tensors through and choose the split-KV segment count.

        Reads only host-side ints and allocates nothing. On the grouped route, and for a
        unified-route step with enough fresh-prefill tokens for the TMA prefill, it also
        launches the request classifier (asynchronously, on the current stream).
        """
        cm = common_attn_metadata
        if common_prefix_len:
            # Cascade attention is off unless a backend opts in via use_cascade_attention.
            raise ValueError("cascade attention (common_prefix_len > 0) is not supported")
        if getattr(cm, "causal", True) is not True:
            raise ValueError("non-causal decoder attention is not supported")

        num_segments, narrow_split = 1, False
        if self.workspace is not None and cm.num_actual_tokens <= self.workspace.max_tokens:
            # (The policy already refuses batches past the workspace; the bound guards
            # against a policy change.)
            num_segments, narrow_split = choose_split(
                cm.num_actual_tokens,
                cm.num_reqs,
                cm.max_query_len,
                self.num_kv_heads,
                self.num_sms,
            )

        request_groups = group_sizes = None
        if self.route == "grouped" or self._may_take_tma_prefill(cm.num_actual_tokens):
            group_sizes = _host_group_sizes(cm) if self.host_lengths_exact else None
            if self.route == "grouped" or (
                group_sizes is not None and self._may_take_tma_prefill(group_sizes[2][0])
            ):
                # The decode group takes every query up to the decode-tile bound, so spec-decode
                # verify steps (1 + num_speculative_tokens <= 8) run as decodes.
                classify_requests(
                    cm.query_start_loc, cm.seq_lens, self.request_groups, MAX_DECODE_QUERY_LEN
                )
                request_groups = self.request_groups
            else:  # a unified-route step that stays on the unified launch
                group_sizes = None

        return PortableAttentionMetadata(
            route=self.route,
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            num_segments=num_segments,
            workspace=self.workspace,
            narrow_split=narrow_split,
            request_groups=request_groups,
            group_sizes=group_sizes,
            precompile=self.precompile,
        )

    def _may_take_tma_prefill(self, num_tokens: int) -> bool:
        """Unified route: whether `num_tokens` reach the TMA prefill's minimum. Tested first on
        the step's tokens (cheap), then on its fresh-prefill tokens."""
        min_tokens = self.tma_prefill_min_tokens
        return min_tokens is not None and num_tokens >= max(min_tokens, 1)


def _host_group_sizes(cm: CommonAttentionMetadata) -> GroupSizes | None:
    """(tokens, requests) of the decode, extend and prefill groups (`group_sizes`), from lengths
    vLLM already has on the host (no sync); None if they are not there (then every group is
    launched over the whole batch).

    `seq_lens_cpu_upper_bound` is exact except for asynchronous spec-decode rows, where it is
    optimistic; those rows have context either way, and a request without context (a prefill)
    is always seen as one, so with exact query lengths every request lands in the group the
    device puts it in: the sizes are exact, which the grids sized from them rely on.
    """
    seq_lens = getattr(cm, "seq_lens_cpu_upper_bound", None)
    if seq_lens is None or seq_lens.shape[0] < cm.num_reqs:
        # Unknown (or, on a release that stops padding it, incomplete).
        return None
    num_reqs = cm.num_reqs
    q_lens = np.diff(cm.query_start_loc_cpu.numpy()[: num_reqs + 1])
    return group_sizes(q_lens, seq_lens.numpy()[:num_reqs], MAX_DECODE_QUERY_LEN)
