"""`prolix train` with every trained batch recorded: the side of test_split.py that torchrun
runs (split placement, gloo) and that the colocated comparison runs as one process.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/split_worker.py OUT ARGS...
    python tests/split_worker.py OUT ARGS...

Rank 0 (the trainer, or the only process) appends one JSON line per step to OUT/batches.jsonl:
the step and, per group, its prompt, its completions' response token ids and their rewards;
then `prolix train ARGS` runs as usual and this script exits with its status.
"""

import json
import sys
from pathlib import Path


def record_batches(out: Path) -> None:
    from prolix.trainer import loop

    collect = loop.Trainer.collect_groups

    def collect_and_record(self, step):
        groups, metrics = collect(self, step)
        if self.parallel.comm.is_main:
            row = {"step": step, "groups": [{"prompt": g.problem.prompt,
                                             "responses": [c.response_ids for c in g.completions],
                                             "rewards": g.rewards.tolist()} for g in groups]}
            with open(out / "batches.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return groups, metrics

    loop.Trainer.collect_groups = collect_and_record


# The imports of torch and the trainer stay out of the module's top level: a reward pool's
# workers start by "spawn", which imports this script again in each of them.
if __name__ == "__main__":
    from prolix.trainer.train import main as train_main

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    record_batches(out)
    sys.exit(train_main(sys.argv[2:]))
