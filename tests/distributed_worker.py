"""The two-rank side of test_distributed.py, run by torchrun on CPU (gloo):

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/distributed_worker.py \
        OUT BASE_MODEL UNTIED_MODEL PROBLEMS SINGLE_CHECKPOINT

Rank 0 saves what the tests compare, as torch files in OUT:
    update_tied.pt, update_untied.pt
                 one RL step's updates on `premade_records` (what the test repeats in one
                 process) with the tied-embedding model and with one whose LM head is its own
                 weight: old/ref log-probs, the gradient of each update, the parameters after,
                 the metrics, the micro-batches each rank packed, and the rollout engine's
                 weights after the sync
    bitwise.pt   the old log-probs of `premade_records` in the batch-invariant mode, each rank
                 computing its share (a verifying step: the trainer's own forward)
    saved_N.pt   `prolix train` for 2 steps (rollouts, evaluation, a reset, checkpoints, W&B
                 offline): the whole weights, optimizer state and reference as the checkpoint of
                 step N saved them
    resumed.pt   the state after resuming SINGLE_CHECKPOINT (single-process format) on 2 ranks
"""

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from trainer_testing import tiny_overrides

from prolix.trainer import loop
from prolix.trainer.config import load_config
from prolix.trainer.loop import Trainer
from prolix.trainer.packing import SequenceRecord
from prolix.trainer.parallel.sharding import full_parameters
from prolix.trainer.train import main as train_main

# One RL step of 4 prompts in 2 mini-batches, with old_logp (2 updates) and a KL term. The
# lengths make the ranks' shares uneven in micro-batches under a 48-token budget: in the first
# mini-batch (46, 30, 25 tokens) one rank gets the 46-token sequence alone, the other 30 + 25
# tokens, two micro-batches; so the first rank runs a zero-weight one. AdamW's ε is raised from
# 1e-8 to 1e-3: its g / (|g| + ε) would turn the fp32 rounding (~1e-8) of a near-zero gradient
# into a difference of a whole lr-sized step between the two sides.
STEP = {"optim.max_tokens_per_microbatch": 48, "optim.lr": 1e-3, "optim.eps": 1e-3, "algorithm.loss.kl_coef": 0.05}
BITWISE = {"algorithm.batch_invariant": "true", "algorithm.verify_on_policy_every": 1}
GROUPS = [(6, (40,)), (5, (25, 20)), (4, (30, 12, 2, 21)), (7, (11,))]   # (prompt length, response lengths)


def premade_records(vocab_size: int) -> list[SequenceRecord]:
    """Rollout records as `make_records` would build them (prompt groups consecutive), without
    sampling: random tokens from a fixed seed, advantages ±1 within each group."""
    g = torch.Generator().manual_seed(1234)
    records = []
    for prompt_len, responses in GROUPS:
        prompt = torch.randint(0, vocab_size, (prompt_len,), generator=g).tolist()
        for j, n in enumerate(responses):
            response = torch.randint(0, vocab_size, (n,), generator=g).tolist()
            records.append(SequenceRecord(token_ids=prompt + response, response_start=prompt_len,
                                          advantage=1.0 if j % 2 == 0 else -0.5,
                                          rollout_logp=[-1.0] * n))
    return records


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def record_gradients(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Whole gradients at each optimizer step (after clipping), in a list that grows."""
    grads, step = [], trainer.optimizer.step

    def step_and_record(*args, **kwargs):
        grads.append({n: full(p.grad) for n, p in trainer.policy.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = step_and_record
    return grads


def run_updates(trainer: Trainer, records: list[SequenceRecord]) -> dict:
    """attach_logps, then every mini-batch's update, recording what each rank packed."""
    grads = record_gradients(trainer)
    packed: list[list[int]] = []
    pack = trainer._pack
    trainer._pack = lambda recs, idx: (packed.append(list(idx)), pack(recs, idx))[1]
    records = trainer.attach_logps(records)
    stats, plans = [], []
    for mini_batch in trainer.mini_batches(records, 1):
        packed.clear()
        stats.append(trainer.update(mini_batch, 1))
        plans.append(list(packed))
    trainer._sync_weights()
    return {"logps": [(r.old_logp, r.ref_logp) for r in records], "grads": grads, "stats": stats, "plans": plans,
            "params": {n: p.clone() for n, p in full_parameters(trainer.policy)},   # whole, either way
            "engine": {n: p.detach().clone() for n, p in trainer.engine.model.named_parameters()}}


def bitwise_old_logps(model: Path, problems: Path, out: Path) -> list[torch.Tensor]:
    """The batch-invariant mode's old log-probs of `premade_records`, computed by a verifying
    step's forward (on this process's share of the micro-batches, merged)."""
    cfg = load_config(None, tiny_overrides(model, problems, out, **STEP, **BITWISE))
    (out / "run").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, out / "run")
    records, _ = trainer.attach_logps_at(premade_records(trainer.policy.config.vocab_size), 1)
    trainer.engine.close()
    return [r.old_logp for r in records]


def state_of(trainer: Trainer) -> dict:
    """Whole weights, reference and optimizer state (names as keys), on every rank alike."""
    optim = get_optimizer_state_dict(trainer.policy, trainer.optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if trainer.optimizer.state else {"state": {}}
    return {"params": dict(full_parameters(trainer.policy)), "optim": optim.get("state", {}),
            "step": trainer.state.step, "reference": dict(full_parameters(trainer.reference)) if trainer.reference is not None else None}


def main(out: Path, base_model: Path, untied_model: Path, problems: Path, single_ckpt: Path) -> None:
    # 1. one step's updates on pre-made records
    for name, model in (("tied", base_model), ("untied", untied_model)):
        cfg = load_config(None, tiny_overrides(model, problems, out / name, **STEP))
        (out / name / "run").mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, out / name / "run")
        dp = trainer.parallel                                               # a DataParallel: 2 ranks
        result = run_updates(trainer, premade_records(trainer.policy.config.vocab_size))
        result["plans"] = dp.comm.all_gather(result["plans"])                   # [rank][update][micro-batch]
        result["world_size"] = dp.comm.world_size
        if dp.comm.is_main:
            torch.save(result, out / f"update_{name}.pt")
        trainer.engine.close()

    # 1b. the batch-invariant mode's old log-probs, each rank its share
    old = bitwise_old_logps(base_model, problems, out / "bitwise")
    if torch.distributed.get_rank() == 0:
        torch.save(old, out / "bitwise.pt")

    # 2. the whole loop through `prolix train`, with every checkpoint's state recorded
    save = loop.Trainer.save

    def save_and_record(self):
        path = save(self)
        state = state_of(self)
        if self.parallel.comm.is_main:
            torch.save(state, out / f"saved_{self.state.step}.pt")
        return path

    loop.Trainer.save = save_and_record
    argv = tiny_overrides(base_model, problems, out / "b", **{
        "run.steps": 2, "run.checkpoint_every": 1, "reference.mode": "every", "reference.every": 2,
        "run.wandb": "true"})            # offline (the test's environment); without wandb: a warning
    assert train_main(argv) == 0
    loop.Trainer.save = save

    # 3. a single-process checkpoint resumed on two ranks
    cfg = load_config(single_ckpt.parent.parent / "config.yaml")
    trainer = Trainer(cfg, single_ckpt.parent.parent, resume_from=single_ckpt)
    state = state_of(trainer)
    if dp.comm.is_main:
        torch.save(state, out / "resumed.pt")
    trainer.engine.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*(Path(a) for a in sys.argv[1:6]))
