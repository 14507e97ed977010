"""The malloc settings that keep RSS from growing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minitune import process_memory as pm

_CHURN = r"""
import ctypes, os, sys
sys.path.insert(0, sys.argv[1])
from minitune.process_memory import tune_malloc
print(tune_malloc(), file=sys.stderr)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)  # glibc would raise its threshold here
before = rss()
blocks = []
for i in range(64):  # variable-size "tensors", each followed by a 64 KiB block still alive, as a step leaves them
    n = (1 << 20) + i * 4096
    b = libc.malloc(n); ctypes.memset(b, 1, n); blocks.append(b)
    keep = libc.malloc(65536); blocks.append(None); blocks.append(keep)
for i in range(0, len(blocks), 3):
    libc.free(blocks[i])
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or pm._glibc() is None, reason="glibc only")
@pytest.mark.parametrize(("env", "kept_mib"), [({}, (0, 4)), ({"MINITUNE_MALLOC": "default"}, (40, 200))])
def test_tuned_malloc_returns_freed_tensors_to_the_system(env, kept_mib):
    """64 MiB of 1-MiB blocks freed: with the tuned thresholds the RSS falls back; with glibc's
    defaults (the threshold raised by the first large free) the heap keeps them."""
    import os

    from .conftest import REPO

    proc = subprocess.run([sys.executable, "-c", _CHURN, str(REPO)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    kept = int(proc.stdout.strip())
    assert kept_mib[0] <= kept <= kept_mib[1], (kept, proc.stderr)
