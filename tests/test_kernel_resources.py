"""Every production kernel configuration compiles for sm_90 and sm_80 without spills, under this
environment's Triton and under the device machine's (3.6).

The Triton interpreter (which runs the numerical tests on CPU) accepts code the GPU compiler
rejects, so the kernels are also compiled for real GPU targets here, offline, with the
compiler and cuobjdump/nvdisasm that ship in the triton wheel. This runs in a subprocess:
the test process has TRITON_INTERPRET=1, which replaces the JIT functions. Register allocation
differs between Triton versions (a config spill-free under one spills under another), so the
same report also comes from the Triton of the GPU machines, in a second environment with that
Triton alone (`make triton36`: `.venv-triton36`, or PROLIX_TRITON36_PYTHON); without it those
cases are skipped, saying how to create it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prolix.kernels.resources import SPILL_BUDGET_BYTES, production_launches

ROOT = Path(__file__).resolve().parent.parent
DEVICE_TRITON = "3.6"
DEVICE_PYTHON = Path(os.environ.get("PROLIX_TRITON36_PYTHON", ROOT / ".venv-triton36" / "bin" / "python"))


def _report(python: str):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    # two compile processes: the test process waits meanwhile, so this uses the CI machine's 2 cores
    proc = subprocess.run([python, "-m", "prolix.kernels.resources", "--json", "--jobs", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), f"no report; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.returncode


@pytest.fixture(scope="module", params=["installed", DEVICE_TRITON])
def report(request):
    if request.param == "installed":
        return _report(sys.executable)
    if not DEVICE_PYTHON.exists():
        pytest.skip(f"no Triton {DEVICE_TRITON} environment at {DEVICE_PYTHON}: `make triton36` creates it "
                    "(the GPU machines' Triton; its register allocation differs from this one's)")
    rows, returncode = _report(str(DEVICE_PYTHON))
    versions = {r["triton"] for r in rows}
    assert versions and all(v.startswith(DEVICE_TRITON + ".") for v in versions), \
        f"{DEVICE_PYTHON} compiled with Triton {versions}, not {DEVICE_TRITON}"
    return rows, returncode


def test_every_production_launch_compiles_for_sm90_and_sm80(report):
    rows, _ = report
    expected = {(launch.name, sm) for sm in (90, 80) for launch in production_launches(sm)}
    assert {(r["launch"], r["arch"]) for r in rows} == expected


def test_no_kernel_spills(report):
    rows, returncode = report
    spilled = [(r["launch"], r["arch"], r["stack"], r["local"]) for r in rows
               if r["stack"] > SPILL_BUDGET_BYTES or r["local"] > SPILL_BUDGET_BYTES]
    assert not spilled, f"register spills (launch, sm, stack, local) under Triton {rows[0]['triton']}: {spilled}"
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
