"""keep_freed_memory: freed blocks stay with the process, so allocating again faults no pages."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tinytx.backends import host_memory

resource = pytest.importorskip("resource")  # Unix only


def page_faults_of_a_fresh_block(megabytes: int) -> int:
    """Minor page faults while a new ``megabytes`` MB block is written (the last one freed)."""
    np.ones(megabytes * 2**20, dtype=np.uint8)  # allocated, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(megabytes * 2**20, dtype=np.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_a_freed_block_is_reused_without_page_faults() -> None:
    if not host_memory.keep_freed_memory():
        pytest.skip("not glibc")
    assert host_memory.kept_bytes() == 256 * 2**20
    # 8 MB is 2048 pages of 4 KiB: handed back to the OS, they fault again when reused.
    assert page_faults_of_a_fresh_block(8) < 64


@pytest.mark.parametrize("bad", [-1, 1.5, "256", True])
def test_a_bad_limit_is_a_clear_error(bad) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        host_memory.keep_freed_memory(bad)
