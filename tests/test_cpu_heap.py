"""keep_heap: after it, a freed vocabulary-sized tensor's pages are reused, not faulted in again each step."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys, torch
from bitft.train.cpu_heap import keep_heap
if sys.argv[1] == "keep":
    assert keep_heap() and keep_heap()  # idempotent
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    g = torch.zeros(49152, 576)  # SmolLM2's tied embedding gradient: 108 MiB, 27,648 pages of 4 KiB
    g += 1
    del g
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults[1:]))  # the first allocation faults its pages in either way
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return statistics.median(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    assert faults_per_step("default") >= 50  # glibc alone maps it anew every time (≥ 54 even as 2 MiB pages)
    assert faults_per_step("keep") < 10  # the same memory again: nothing faulted in
