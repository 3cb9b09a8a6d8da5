"""Paged attention in plain PyTorch: the independent yardstick for every kernel.

It loops over sequences, gathers each one's pages through the block table, and computes the
softmax in fp32 (or fp64 when asked), with the same causal, sliding-window, softcap, ALiBi and
sink semantics as the kernels. Its signature mirrors `kernels.unified_attention`, so tests and
benchmarks can swap providers by name. It is written for clarity, not speed.
"""

from __future__ import annotations

from typing import Any

import torch


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    max_query_len: int,
    max_seq_len: int,
    softmax_scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    **unused: Any,
) -> None:
    """Write attention of every sequence's queries over its paged keys into `output`.

    Shapes as in `unified_attention`. Rows of tokens outside every sequence are not written.
    Keys of sequence b are positions [0, seq_lens[b]); its queries are the last q_len of them.
    """
    del max_query_len, max_seq_len, unused
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    page_size = key_cache.shape[1]
    k_mul = 1.0 if k_scale is None else float(k_scale)
    v_mul = 1.0 if v_scale is None else float(v_scale)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        pages = block_table[b, : -(-seq_len // page_size)].long()
        k = key_cache[pages].reshape(-1, num_kv_heads, key_cache.shape[3])[:seq_len]
        v = value_cache[pages].reshape(-1, num_kv_heads, value_cache.shape[3])[:seq_len]
        group = num_heads // num_kv_heads
        k = k.to(compute_dtype).repeat_interleave(group, dim=1) * k_mul  # [seq, H, D]
        v = v.to(compute_dtype).repeat_interleave(group, dim=1) * v_mul
        q = query[q_start:q_end].to(compute_dtype)  # [q_len, H, D]

        scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        if alibi_slopes is not None:
            slopes = alibi_slopes.to(compute_dtype)[:, None, None]
            scores = scores + slopes * (k_pos - q_pos).to(compute_dtype)
        visible = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device)
        if causal:
            visible &= k_pos <= q_pos
        if sliding_window is not None:
            visible &= q_pos - k_pos < sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))

        if sinks is not None:
            # The sink is one more logit per head that takes probability mass but has no value.
            sink = sinks.to(compute_dtype)[:, None, None].expand(-1, q_len, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            # A row with no visible key is defined as zero output (the kernels do the same).
            row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(compute_dtype).min)
            weights = torch.exp(scores - row_max)
            denom = weights.sum(dim=-1, keepdim=True)
            probs = weights / torch.where(denom == 0, 1, denom)
        out = torch.einsum("hqk,khd->qhd", probs, v)
        output[q_start:q_end] = out.to(output.dtype)
