"""How glibc's malloc treats large blocks: the setting the RL recipes run under, and the exception
the decoder's packed weights need. Elsewhere (other libcs) both do nothing.

By default an allocation of more than 128 KB-32 MB gets its own mmap and goes back to the OS when
freed, so every training pass page-faults (and the kernel zeroes) its activations afresh.
`keep_freed_memory` keeps freed blocks in the heap for reuse instead. `own_mappings` makes an
exception for a block of code whose large allocations should leave nothing in the heap.
"""
from __future__ import annotations

import contextlib
import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4  # mallopt's parameters (malloc.h)
DEFAULT_MMAP_MAX = 65536
_keeping = False


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory(keep: bool = True) -> bool:
    """Make malloc keep freed memory for reuse instead of returning it to the OS.

    ~1.6 s of a 7 s LoRA forward + backward of SmolLM2 was page faults before
    (docs/benchmarks.md, "Keeping freed memory"). With mmap off and no trimming, the heap grows to the
    peak once and is reused. Freed memory stays resident until reused, and the heap fragments:
    the peak can grow (SmolLM2, LoRA, 16 sequences in one pass: 4.92 -> 5.44 GB; in micro-batches
    of 4: 2.37 -> 2.44 GB). Results do not change (torch aligns its buffers itself). The RL
    runtime calls it for every stage on the CPU. Returns False where it cannot (not glibc)."""
    global _keeping
    libc = _libc()
    if libc is None:
        return False
    if not keep:  # glibc's defaults again: large blocks mmapped, returned to the OS when freed
        settings = ((M_MMAP_MAX, DEFAULT_MMAP_MAX), (M_MMAP_THRESHOLD, 128 << 10), (M_TRIM_THRESHOLD, 128 << 10),
                    (M_TOP_PAD, 0))
        _keeping = not all(libc.mallopt(param, value) == 1 for param, value in settings)
        return not _keeping
    _keeping = all(libc.mallopt(param, value) == 1 for param, value in
                   ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1), (M_TOP_PAD, 64 << 20)))
    return _keeping


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc's `malloc_trim`), keeping its layout.

    Under `keep_freed_memory` the previous step's freed activations stay resident until reused.
    The native rollout engine calls this before each rollout when `rollout.release_memory` is set: the rollout's
    packed weights (own mappings) would otherwise come on top of that high-water mark (SmolLM2,
    full fine-tuning in micro-batches of 4: the rollout's peak was the step's). The price is
    paid by the next training passes, which fault the released pages in again: 0.15 s per GB on
    a good day here, ~3 s per step of one pass of 16 (full fine-tuning) on a slow one
    (docs/benchmarks.md, "`release_memory`"). Returns False where it cannot (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def own_mappings(min_bytes: int = 4 << 20):
    """Inside the block, allocations of `min_bytes` or more get their own mmap, returned to the OS
    when freed, even under `keep_freed_memory`. For large blocks that outlive the block but not
    the next phase, whose freed space in the heap would otherwise raise its high-water mark: MKL
    asks for 4x the bytes of a packed weight and touches a quarter, and in the heap the rest is
    resident once the training passes reuse it (SmolLM2, LoRA: +1.1 GB of peak RSS). The mmap
    threshold stays fixed at `min_bytes` afterwards (glibc's default adapts it)."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, min_bytes)
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, 0 if _keeping else DEFAULT_MMAP_MAX)
