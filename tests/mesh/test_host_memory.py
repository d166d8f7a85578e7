"""A plugin host hands the heap pages start-up freed back to the OS once it serves
(``mesh._host.release_startup_memory``, called by ``run_plugin``): 1.85 MB of an idle host's RSS."""

from __future__ import annotations

import ctypes

import pytest

from mesh._host import release_startup_memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).malloc_trim  # noqa: B018  (present in glibc only)
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's; elsewhere release_startup_memory does nothing")
def test_memory_freed_inside_the_heap_goes_back_to_the_os() -> None:
    # 30 MB of blocks from malloc (bytes over pymalloc's 512), freed while later blocks keep the
    # heap's top in place: glibc keeps those pages mapped until something trims them.
    blocks = [bytes(1000) + bytes([i % 256]) for i in range(30_000)]
    later = [bytes(1000) + b"k" for _ in range(10)]
    del blocks
    before = _rss()
    assert release_startup_memory() is True
    assert before - _rss() > 10_000_000, f"RSS {before / 1e6:.1f} MB before, {_rss() / 1e6:.1f} MB after"
    assert later  # (kept alive to here)
