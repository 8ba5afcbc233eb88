#!/bin/bash
# One node's part of train.sbatch (srun starts it once per node): torchrun with the job's
# rendezvous and GPUS_PER_NODE workers running `prolix train "$@"`.
#
# When Slurm signals this task (SIGTERM before the time limit, or a preemption), the workers get
# the SIGTERM themselves: each finishes its step, the run writes a checkpoint and every rank
# exits 143. torchrun would forward the signal too, but kill its workers 30 s later, before a
# long step could finish.
set -uo pipefail

"${PYTHON:-python}" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node="${GPUS_PER_NODE:-8}" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts=0 -m prolix.trainer.cli train "$@" &
agent=$!
trap 'pkill -TERM -P "$agent"' TERM INT
wait "$agent"
status=$?
while kill -0 "$agent" 2>/dev/null; do          # the trap interrupted `wait`: wait for torchrun itself
    wait "$agent"
    status=$?
done
exit "$status"
