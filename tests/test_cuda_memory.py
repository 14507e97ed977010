"""minitune.cuda_memory: the CUDA caching allocator's policy replayed on allocation sizes, cuBLAS's
workspaces, and the terms a CUDA plan adds to the tensors' peak. Expected values are worked out by
hand from c10/cuda/CUDACachingAllocator.cpp's rules (see the module docstring)."""

from __future__ import annotations

import pytest

from minitune.cuda_memory import (
    CONTEXT_BYTES,
    MODULE_ALLOWANCE,
    CachingAllocatorModel,
    cublas_workspace_bytes,
    cuda_process_terms,
    replay,
    round_size,
    segment_size,
)

MiB = 2**20


def alloc(*sizes: int, start: int = 0) -> list[tuple[int, int]]:
    return [(start + i, s) for i, s in enumerate(sizes)]


@pytest.mark.parametrize(("nbytes", "block", "segment"), [
    (1, 512, 2 * MiB), (513, 1024, 2 * MiB), (MiB, MiB, 2 * MiB),  # small pool: 2 MiB segments
    (MiB + 1, MiB + 512, 20 * MiB), (10 * MiB - 512, 10 * MiB - 512, 20 * MiB),  # 1-10 MiB: a 20 MiB segment
    (10 * MiB, 10 * MiB, 10 * MiB), (10 * MiB + 1, 10 * MiB + 512, 12 * MiB),  # larger: rounded to 2 MiB
])
def test_block_and_segment_sizes(nbytes, block, segment):
    assert round_size(nbytes) == block
    assert segment_size(block) == segment


def test_small_requests_share_a_segment_until_it_is_full():
    stats = replay(alloc(*[512 * 1024] * 4))
    assert (stats.reserved, stats.segments, stats.allocated) == (2 * MiB, 1, 2 * MiB)
    stats = replay(alloc(*[512 * 1024] * 5))
    assert (stats.reserved, stats.segments) == (4 * MiB, 2)


def test_a_large_block_is_not_split_for_a_remainder_of_1_mib_or_less():
    # 19.5 MiB: a 20 MiB segment whose 0.5 MiB rest is handed out with it (allocated counts the block)
    stats = replay(alloc(19 * MiB + MiB // 2))
    assert (stats.allocated, stats.reserved) == (20 * MiB, 20 * MiB)
    # 9 MiB: a 20 MiB segment too, whose 11 MiB rest is split off and serves a later 1.5 MiB request
    stats = replay(alloc(9 * MiB, MiB + MiB // 2))
    assert (stats.allocated, stats.reserved, stats.segments) == (10 * MiB + MiB // 2, 20 * MiB, 1)


def test_freed_blocks_are_cached_and_fragment():
    # two 12 MiB tensors, the first freed: a 14 MiB request does not fit its cached block
    stats = replay([*alloc(12 * MiB, 12 * MiB), (0, None), (2, 14 * MiB)])
    assert (stats.allocated, stats.reserved, stats.peak_reserved) == (26 * MiB, 38 * MiB, 38 * MiB)
    # ... but a 10 MiB one does, from the cache (best fit; the 2 MiB rest is split off)
    stats = replay([*alloc(12 * MiB, 12 * MiB), (0, None), (2, 10 * MiB)])
    assert (stats.reserved, stats.segments) == (24 * MiB, 2)


def test_freed_neighbours_merge_back():
    model = CachingAllocatorModel()
    replay([(0, 30 * MiB), (0, None), (1, 10 * MiB), (2, 10 * MiB), (3, 10 * MiB)], model)
    assert (model.reserved, model.segments) == (30 * MiB, 1)  # three splits of the cached segment
    replay([(1, None), (2, None), (3, None), (4, 30 * MiB)], model)
    assert (model.reserved, model.segments, model.allocated) == (30 * MiB, 1, 30 * MiB)  # merged whole again
    replay([(4, None), (1, 10 * MiB), (3, 10 * MiB), (1, None), (5, 20 * MiB)], model)
    assert model.reserved == 50 * MiB  # 10 MiB free before a live block and 10 after: no 20 MiB block


def test_cublas_workspace_follows_torch_defaults():
    assert cublas_workspace_bytes((7, 5)) == 2 * 4096 * 1024 + 8 * 16 * 1024  # :4096:2:16:8
    assert cublas_workspace_bytes((8, 0)) == cublas_workspace_bytes((8, 9)) == 8_519_680
    assert cublas_workspace_bytes((9, 0)) == 32 * MiB  # :4096:8 on Hopper


def test_process_terms_add_the_context_the_workspaces_and_the_cache():
    terms = cuda_process_terms([], capability=(7, 5))
    # the two 8.125 MiB workspaces share one 20 MiB segment; what is left of it is cache
    assert terms == {"cuda_context": CONTEXT_BYTES + MODULE_ALLOWANCE, "cublas_workspace": 2 * 8_519_680,
                     "tensors": 0, "allocator_cache": 20 * MiB - 2 * 8_519_680}
    # Hopper's context: the one measured there (527 MiB)
    assert cuda_process_terms([], capability=(9, 0))["cuda_context"] == 527 * MiB + MODULE_ALLOWANCE
    terms = cuda_process_terms(alloc(12 * MiB, 12 * MiB), capability=(9, 0), context=0)
    assert terms == {"cuda_context": 0, "cublas_workspace": 64 * MiB, "tensors": 24 * MiB, "allocator_cache": 0}
    assert sum(cuda_process_terms([(0, 3 * MiB), (0, None), (1, 12 * MiB)], context=0).values()) == \
        20 * MiB + 12 * MiB  # workspaces and the 3 MiB tensor in one 20 MiB segment, then a 12 MiB one
