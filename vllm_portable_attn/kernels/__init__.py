"""Triton kernels of vllm_portable_attn. Nothing here imports vLLM.

Each module holds one kernel family and one public launcher; this package re-exports them.
"""

from vllm_portable_attn.kernels._common import device_num_sms
from vllm_portable_attn.kernels.cache_write import write_kv_cache
from vllm_portable_attn.kernels.classify import (
    GROUP_DECODE,
    GROUP_EXTEND,
    GROUP_PADDING,
    GROUP_PREFILL,
    GroupSizes,
    RequestGroups,
    classify_requests,
    group_sizes,
)
from vllm_portable_attn.kernels.configs import (
    MAX_DECODE_QUERY_LEN,
    MAX_SEGMENTS,
    MAX_SPLIT_TOKENS,
    attention_config,
    choose_num_segments,
    choose_split,
    count_score_features,
)
from vllm_portable_attn.kernels.grouped import grouped_attention
from vllm_portable_attn.kernels.split_kv import SplitKVWorkspace, merge_segments
from vllm_portable_attn.kernels.tma_prefill import choose_tma_prefill
from vllm_portable_attn.kernels.unified import unified_attention

__all__ = [
    "GROUP_DECODE",
    "GROUP_EXTEND",
    "GROUP_PADDING",
    "GROUP_PREFILL",
    "GroupSizes",
    "MAX_DECODE_QUERY_LEN",
    "MAX_SEGMENTS",
    "MAX_SPLIT_TOKENS",
    "RequestGroups",
    "SplitKVWorkspace",
    "attention_config",
    "choose_num_segments",
    "choose_split",
    "choose_tma_prefill",
    "classify_requests",
    "count_score_features",
    "device_num_sms",
    "group_sizes",
    "grouped_attention",
    "merge_segments",
    "unified_attention",
    "write_kv_cache",
]
