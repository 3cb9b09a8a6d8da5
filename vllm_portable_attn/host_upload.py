"""A ring of host staging buffers for small per-step uploads, copied without a host sync.

Why a ring: an asynchronous host->device copy reads its source when the device gets to it, so
the host may not rewrite that buffer until then. Each slot therefore carries an event recorded
after its copy; a slot is reused only once its event has completed (`event.query()`, which
never waits). A host that runs more steps ahead of the device than there are slots finds no
free slot, and the caller takes another route for that step instead of waiting.

Why pinned: only a copy from page-locked memory is truly asynchronous; from pageable memory
CUDA stages it through a driver buffer and the call waits for that.

On a CPU device there is nothing to overlap: no pinning, no events, and `upload` is a plain
copy, so CPU tests exercise the same calls.
"""

from __future__ import annotations

import numpy as np
import torch

#: Slots of a ring: a step's upload may still be queued behind the previous steps' work when
#: the next build runs (vLLM's asynchronous scheduling prepares a step while the device runs
#: the last), and a drafter may build several times per step; a few slots cover that.
DEFAULT_NUM_SLOTS = 4


class HostUploadRing:
    """Host buffers shaped like one device tensor, filled in turn and copied to it.

    Usage, once per step: ``buf = ring.acquire()``; if it is not None, fill the numpy array
    ``buf`` and call ``ring.upload(dst)``. Everything is allocated here, once.
    """

    def __init__(self, like: torch.Tensor, num_slots: int = DEFAULT_NUM_SLOTS) -> None:
        if num_slots < 1:
            raise ValueError(f"a ring needs at least one slot, not {num_slots}")
        self._on_gpu = like.device.type == "cuda"
        self._buffers = [
            torch.zeros(like.shape, dtype=like.dtype, pin_memory=self._on_gpu)
            for _ in range(num_slots)
        ]
        # numpy views of the same memory: the host fills them without torch's per-op cost.
        self._arrays = [buffer.numpy() for buffer in self._buffers]
        # Never recorded yet, an event counts as complete.
        self._events = [torch.cuda.Event() for _ in range(num_slots)] if self._on_gpu else None
        self._oldest = 0  # the slot whose copy was issued longest ago: the next to reuse
        self._acquired: int | None = None

    @property
    def num_slots(self) -> int:
        return len(self._buffers)

    def acquire(self) -> np.ndarray | None:
        """The next slot's host array if its last copy has finished, else None (never waits).

        Only the oldest slot is asked: copies run in the order they were issued on one
        stream, so when the oldest is still pending, the newer ones are too.
        """
        slot = self._oldest
        if self._events is not None and not self._events[slot].query():
            return None
        self._acquired = slot
        return self._arrays[slot]

    def upload(self, dst: torch.Tensor) -> None:
        """Copy the acquired slot into `dst` (asynchronously, on the current stream, from
        pinned memory) and mark the slot busy until the device has read it."""
        slot = self._acquired
        if slot is None:
            raise RuntimeError("upload() needs a slot from acquire() first")
        dst.copy_(self._buffers[slot], non_blocking=self._on_gpu)
        if self._events is not None:
            self._events[slot].record()
        self._acquired = None
        self._oldest = (slot + 1) % len(self._buffers)
