"""The allocator setting, observed from outside: freed large blocks stay in the process for reuse."""

from __future__ import annotations

import subprocess
import sys

import pytest

from perceiver.training.device import keep_freed_memory

PROBE = """
import sys, torch
from perceiver.training.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
base = resident_mib()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
block = None
print(resident_mib() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc are Linux's")
def test_freed_large_blocks_stay_resident_only_with_the_setting() -> None:
    def kept_mib(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return float(done.stdout.strip())

    assert kept_mib("default") < 16  # glibc unmapped the block on free
    assert kept_mib("keep") > 60  # kept for the next step's activations


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reports_success() -> None:
    assert keep_freed_memory() is True
