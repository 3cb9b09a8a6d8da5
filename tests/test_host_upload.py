"""The host staging ring (host_upload.py): slots in turn, one copy per upload, no waiting."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from vllm_portable_attn.host_upload import HostUploadRing


def test_ring_hands_out_its_slots_in_turn_and_uploads_the_acquired_one() -> None:
    dst = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    ring = HostUploadRing(dst, num_slots=3)
    seen = []
    for step in range(7):
        staging = ring.acquire()
        assert staging is not None and staging.shape == (6,)
        assert ring.acquire() is staging  # not consumed until uploaded
        staging[:] = step
        ring.upload(dst)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        assert dst.tolist() == [step] * 6
        seen.append(staging)
    # Round robin: a slot comes back only after the others were used.
    for step in range(3, 7):
        assert seen[step] is seen[step - 3]
        assert seen[step] is not seen[step - 1] and seen[step] is not seen[step - 2]


def test_upload_needs_an_acquired_slot() -> None:
    dst = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    ring = HostUploadRing(dst, num_slots=2)
    with pytest.raises(RuntimeError, match="acquire"):
        ring.upload(dst)
    ring.acquire()
    ring.upload(dst)
    with pytest.raises(RuntimeError, match="acquire"):
        ring.upload(dst)  # one upload per acquire


@pytest.mark.gpu
def test_gpu_ring_is_pinned_and_never_reuses_a_slot_still_being_read() -> None:
    dst = torch.zeros(1024, dtype=torch.int32, device="cuda")
    ring = HostUploadRing(dst, num_slots=2)
    assert all(buffer.is_pinned() for buffer in ring._buffers)
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # the copies queue behind about half a second of sleep
    for step in range(2):
        staging = ring.acquire()
        assert staging is not None
        staging[:] = step
        ring.upload(dst)
    assert ring.acquire() is None  # both copies still pending: no slot, and no waiting
    torch.cuda.synchronize()
    assert dst.tolist() == [1] * 1024
    assert ring.acquire() is not None
