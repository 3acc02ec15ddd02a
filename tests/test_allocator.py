"""Keeping freed memory: a repeated step stops faulting pages in; a user's own setting wins.

Each case runs in a fresh interpreter, since malloc's settings are process-wide and the trainer
changes them in this one.
"""

import os
import platform
import subprocess
import sys

import pytest

from difflm.train.allocator import ENV_VARS, keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a "step": ten 4 MB activations allocated, then freed together; prints the page faults of the
# fourth step (after three that warm up) and whether the allocator was tuned
STEP = """
import resource, torch
from difflm.train.allocator import keep_freed_memory
tuned = keep_freed_memory()
def step():
    held = [torch.ones(1024 * 1024) for _ in range(10)]
    del held
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, tuned)
"""


def faults_of_a_step(**env: str) -> tuple[int, bool]:
    clean = {name: value for name, value in os.environ.items() if name not in ENV_VARS}
    done = subprocess.run(
        [sys.executable, "-c", STEP], env=clean | env, capture_output=True, text=True, check=True
    )
    faults, tuned = done.stdout.split()
    return int(faults), tuned == "True"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_repeated_step_reuses_its_pages_once_freed_memory_is_kept():
    faults, tuned = faults_of_a_step()
    assert tuned
    assert faults < 100


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_users_own_malloc_setting_is_left_alone():
    """glibc's starting threshold, pinned by the user: every 4 MB block is mapped and faulted in
    again at every step (left to itself glibc raises the threshold at some point, or not)."""
    faults, tuned = faults_of_a_step(MALLOC_MMAP_THRESHOLD_="131072")
    assert not tuned
    assert faults > 5000  # ~10,000 pages


@pytest.mark.skipif(GLIBC, reason="for platforms without glibc")
def test_without_glibc_nothing_changes():
    assert keep_freed_memory() is False
