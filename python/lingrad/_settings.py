"""lingrad.settings: the SIMD code path and the thread count for a block of code, restored after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ._C import get_isa, get_num_threads, set_isa, set_num_threads


@contextmanager
def settings(isa: str | None = None, threads: int | None = None) -> Iterator[None]:
    """Run a block with the SIMD code path `isa` and `threads` threads (``None`` leaves a setting
    as it is), then restore both to what they were before, also when the block raises::

        with lingrad.settings(isa="generic", threads=1):
            y = lingrad.kernels.linear_forward(x, w, b)

    The values are checked as :func:`lingrad.set_isa` and :func:`lingrad.set_num_threads` check
    them, with the same errors (nothing stays changed when one fails). As those setters, it sets
    the settings of the process, which every Python thread shares: blocks that other threads run at
    the same time see (and restore) each other's. Blocks nest."""
    previous_isa, previous_threads = get_isa(), get_num_threads()
    try:
        if isa is not None:
            set_isa(isa)
        if threads is not None:
            set_num_threads(threads)
        yield
    finally:
        set_isa(previous_isa)
        set_num_threads(previous_threads)
