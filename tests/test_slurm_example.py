"""examples/slurm/train.sbatch on a fake allocation: Slurm's `srun` and `scontrol` and the Python
interpreter are stubs that record what they are asked, so the test reads the torchrun command
line each node would run, for the colocated and the split placement, a fresh and a requeued run.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"

# srun: the command once per node, with the node's SLURM_NODEID, as --ntasks-per-node=1 does.
SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
status=0
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || status=$?; done
exit $status
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
if [[ $1 == show ]]; then printf 'gpu-a01\\ngpu-a02\\n'; fi
"""
PYTHON = """#!/bin/bash
printf '%q ' "$@" >> "$STUB_LOG"; echo >> "$STUB_LOG"
exit "${STUB_STATUS:-0}"
"""


def _render(tmp_path: Path, status: int = 0, args=(), **env) -> tuple[int, list[list[str]], list[str]]:
    """(exit status, the argv of each node's python, the scontrol calls) of one fake job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python-stub", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    environ = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_LOG": str(log),
               "STUB_STATUS": str(status), "PYTHON": str(bin_dir / "python-stub"), "SLURM_JOB_ID": "123456",
               "SLURM_JOB_NAME": "prolix", "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_NNODES": "2",
               "SLURM_SUBMIT_DIR": str(ROOT), "CONFIG": "cfg.yaml", "RUNS_DIR": str(tmp_path / "runs"),
               "TMPDIR": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SBATCH), *args], env=environ, capture_output=True, text=True, timeout=60)
    lines = log.read_text().splitlines() if log.exists() else []
    nodes = [shlex.split(x) for x in lines if not x.startswith("scontrol ")]
    return proc.returncode, nodes, [x for x in lines if x.startswith("scontrol ")]


TORCHRUN = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=gpu-a01:{20000 + 123456 % 20000}", "--rdzv-id=123456", "--max-restarts=0",
            "-m", "prolix.trainer.cli", "train"]


def test_colocated_job_runs_one_torchrun_per_node_with_the_jobs_rendezvous(tmp_path):
    status, nodes, _ = _render(tmp_path, args=["optim.lr=1e-6"])
    assert status == 0
    runs = tmp_path / "runs"
    assert nodes == [TORCHRUN + ["--config", "cfg.yaml", f"run.out_dir={runs}", "run.name=prolix", "optim.lr=1e-6"]] * 2


def test_split_job_gives_the_last_ranks_to_generation(tmp_path):
    status, nodes, _ = _render(tmp_path, PLACEMENT="split", ROLLOUT_RANKS="4", GPUS_PER_NODE="4")
    assert status == 0 and len(nodes) == 2
    assert nodes[0][:4] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4"]
    assert nodes[0][-2:] == ["rollout.placement=split", "rollout.rollout_ranks=4"]
    assert _render(tmp_path, PLACEMENT="pipeline")[0] == 2


@pytest.mark.parametrize("status, requeued", [(143, True), (1, False)])
def test_a_job_stopped_with_a_checkpoint_requeues_and_then_resumes_its_run(tmp_path, status, requeued):
    code, _, calls = _render(tmp_path, status=status)
    assert code == status
    assert ("scontrol requeue 123456" in calls) == requeued
    (tmp_path / "runs" / "prolix" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "prolix" / "checkpoints" / "latest").write_text("step_000040\n")
    _, nodes, _ = _render(tmp_path)
    assert nodes == [TORCHRUN + ["--resume", str(tmp_path / "runs" / "prolix")]] * 2
