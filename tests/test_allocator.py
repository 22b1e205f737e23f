"""glibc malloc settings: a large buffer comes from the heap (reused when freed), not from a fresh mapping."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nervedet import allocator

SCRIPT = """
import ctypes, sys
from nervedet.allocator import keep_large_buffers

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "keep":
    assert keep_large_buffers()
before = libc.mallinfo2().hblkhd  # bytes in mappings made for single allocations
p = libc.malloc(64 << 20)  # as large as a tile's activation buffer
print((libc.mallinfo2().hblkhd - before) >> 20)
libc.free(p)
"""


def _mapped_mb(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(allocator._libc() is None or not hasattr(allocator._libc(), "mallinfo2"),
                    reason="the C library is not glibc 2.33 or later")
def test_a_large_buffer_comes_from_the_heap_where_freed_memory_is_reused() -> None:
    assert _mapped_mb("default") >= 64  # glibc's default: a mapping of its own, unmapped when freed
    assert _mapped_mb("keep") == 0


def test_the_users_own_allocator_settings_are_left_alone(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setattr(allocator, "_libc", lambda: pytest.fail("mallopt must not be called"))
    assert allocator.keep_large_buffers() is False


ARENAS_SCRIPT = """
import ctypes, sys, threading
from nervedet.allocator import keep_large_buffers

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_large_buffers()
start = threading.Barrier(8)

def churn():  # many threads allocating at once: glibc gives contending threads arenas of their own
    start.wait()
    for _ in range(20000):
        libc.free(libc.malloc(4096))  # ctypes lets go of the GIL: the calls do contend

threads = [threading.Thread(target=churn) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.malloc_stats()  # one "Arena n:" block per arena, on stderr
"""


def _arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", ARENAS_SCRIPT, mode], capture_output=True, text=True, env=env,
                         check=True)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


@pytest.mark.skipif(allocator._libc() is None or not hasattr(allocator._libc(), "malloc_stats"),
                    reason="the C library is not glibc")
def test_threads_share_at_most_the_capped_number_of_malloc_arenas() -> None:
    assert _arenas("default") > allocator.ARENAS  # glibc's default: contending threads get arenas of their own
    assert 1 <= _arenas("keep") <= allocator.ARENAS
