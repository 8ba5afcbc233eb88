"""Every production kernel configuration compiles for sm_90 and sm_80, without spills.

The Triton interpreter (which runs the numerical tests on CPU) accepts code the GPU compiler
rejects, so the kernels are also compiled for real GPU targets here, offline, with the
compiler and cuobjdump/nvdisasm that ship in the triton wheel. This runs in a subprocess:
the test process has TRITON_INTERPRET=1, which replaces the JIT functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prolix.kernels.resources import production_launches


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "prolix.kernels.resources", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), f"no report; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.returncode


def test_every_production_launch_compiles_for_sm90_and_sm80(report):
    rows, _ = report
    expected = {(launch.name, sm) for sm in (90, 80) for launch in production_launches(sm)}
    assert {(r["launch"], r["arch"]) for r in rows} == expected


# A spilled scalar or two (8–16 B of stack per thread) is what the fastest measured forward
# config costs (kernels/linear_logprob.py: forward_config); a spilled tile is hundreds of bytes.
from prolix.kernels.resources import SPILL_BUDGET_BYTES  # noqa: E402


def test_no_kernel_spills_a_tile(report):
    rows, returncode = report
    spilled = [(r["launch"], r["arch"], r["stack"], r["local"]) for r in rows
               if r["stack"] > SPILL_BUDGET_BYTES or r["local"] > SPILL_BUDGET_BYTES]
    assert not spilled, f"register spills over {SPILL_BUDGET_BYTES} B (launch, sm, stack, local): {spilled}"
    assert returncode == 0


def test_16bit_kernels_use_hopper_wgmma_on_sm90(report):
    rows, _ = report
    # wgmma is None for the elementwise kernels (no dot: nothing to look for)
    slow = [r["launch"] for r in rows if r["arch"] == 90 and "fp32" not in r["launch"] and r["wgmma"] is False]
    assert not slow, f"no HGMMA in the sm_90 SASS of {slow}"


def test_shared_memory_fits_the_smallest_target(report):
    rows, _ = report
    # sm_80 (A100) allows 163 KB of shared memory per block; sm_90 227 KB.
    limits = {80: 163 * 1024, 90: 227 * 1024}
    over = [(r["launch"], r["arch"], r["shared"]) for r in rows if r["shared"] > limits[r["arch"]]]
    assert not over, over
