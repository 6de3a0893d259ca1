"""Handing the memory that glibc keeps after ``free`` back to the operating system (CPU runs).

On CPU the tensors live on glibc's heap. Freed blocks stay with the process until they can be merged at the top of
the heap, so resident memory holds both what is live and the holes left by earlier allocations: converting the base
to bf16 on load leaves ~50 MB of such holes on the benchmark model, and a training step whose shapes differ from the
previous one's (packed micro-batches of 9-12 sequences, loss chunks) finds few of its sizes in the holes and grows
the heap again, step after step. ``malloc_trim(0)`` returns every free page of every heap; freeing is cheap (about
a millisecond) and only the pages touched again by the next step are faulted back in. Environment settings such as
``MALLOC_MMAP_THRESHOLD_`` bound resident memory as well, but make every large tensor a fresh mapping whose pages
are faulted in anew on each use (measured 0.6x the training speed, benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from transformers import TrainerCallback


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system; False where the C library cannot (no glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class ReleaseFreeMemory(TrainerCallback):
    """After every optimizer step, hand the step's freed heap memory back (CPU training: see the module docstring)
    so that the heap does not grow with each new micro-batch shape."""

    def on_step_end(self, args, state, control, **kwargs) -> None:
        release_free_memory()
