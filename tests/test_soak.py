"""Soak: a few hundred real RL steps hold memory and live objects flat.

ProRL runs go for thousands of steps; a leak of a few tensors or a few hundred bytes per step
(a list of metrics that grows, an autograd graph kept alive by a stored loss, optimizer states
orphaned by the reference resets) only shows after hours. Here the whole loop (`fit`: rollout,
reward, old/ref log-probs, two updates per step, weight sync, a reference reset with a fresh
AdamW every RESET_EVERY steps, logging, checkpoints) runs STEPS steps of the tiny model, and
after WARMUP steps the resident set size, the live tensors, the gc-tracked objects and Python's
allocated memory blocks may grow by at most the slacks below.

The slacks leave room around these figures of a 2-core CPU box (torch sampler, one thread,
16 responses of <= 4 tokens a step): 65-75 ms per step, 20-23 s for the test. From step 100 to
300: RSS +0.6 to +4.7 MB (one allocator step, then flat), live tensors 134 -> 134, other
gc-tracked objects unchanged, Python memory blocks +1.3 per step (library caches; +0.1 per
step over steps 300-1000 of a 1000-step run, RSS +1 MB over those 700 steps).
`-m "not soak"` deselects it.
"""

import gc
import os
import sys

import pytest
import torch
from trainer_testing import make_trainer, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 300
RESET_EVERY = 60                  # 5 resets, each a fresh AdamW and a reference copy
CHECKPOINT_EVERY = 50
WARMUP = 100                      # allocator pools, AdamW moments, lazy caches settle by then
SAMPLE_EVERY = 20
RSS_SLACK_MB = 12.0               # glibc grows an arena by ~4 MB now and then
TENSOR_SLACK = 4                  # e.g. a rotary cache first built for a longer sequence
OBJECT_SLACK = 20                 # gc-tracked containers; one leaked per step adds 200
BLOCKS_PER_STEP = 4.0             # Python memory blocks: a leaked record of floats adds 5+ per step

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:                  # size resident shared ... (in pages)
        return int(f.read().split()[1]) * PAGE / 2**20


def live_counts() -> tuple[int, int, int]:
    """(live tensors, other gc-tracked objects, Python memory blocks).

    Not counted as objects: the UntypedStorage wrappers torch.save caches on each tensor it
    writes (AdamW's 78 moment tensors carry them from a checkpoint until the next reset), which
    would make the count alternate by 78. Blocks also count objects gc does not track (floats,
    dicts of plain numbers), but drift up slowly (~1 per step) while library caches warm up."""
    gc.collect()
    # type(), not isinstance(): the latter reads __class__, which some deprecated proxies warn on
    kinds = [type(o) for o in gc.get_objects()]
    tensors = sum(issubclass(k, torch.Tensor) for k in kinds)
    others = sum(not issubclass(k, (torch.Tensor, torch.UntypedStorage)) for k in kinds)
    return tensors, others, sys.getallocatedblocks()


@pytest.mark.soak
def test_hundreds_of_steps_hold_memory_and_live_objects_flat(base_model, problems, tmp_path):
    trainer = make_trainer(base_model, problems, tmp_path, **{
        "run.steps": STEPS, "rollout.max_tokens": 4, "run.checkpoint_every": CHECKPOINT_EVERY, "run.keep_last": 1,
        "reference.mode": "every", "reference.every": RESET_EVERY, "eval.every": 0, "eval.at_start": "false",
        # every step trains: without dynamic sampling a group whose rewards collapsed still
        # gives an update (KL term), and a small lr keeps the random policy from collapsing
        "algorithm.dynamic_sampling": "false", "optim.lr": 1e-3})
    samples: list[tuple[int, float, int, int, int]] = []       # (step, RSS MB, tensors, objects, blocks)
    real_step = trainer.train_step

    def train_step_and_sample():
        metrics = real_step()
        step = trainer.state.step
        if step >= WARMUP and step % SAMPLE_EVERY == 0:
            samples.append((step, rss_mb(), *live_counts()))
        return metrics

    trainer.train_step = train_step_and_sample
    trainer.fit()

    assert trainer.state.step == STEPS and len(trainer.state.resets) == STEPS // RESET_EVERY
    assert all(r["updates"] == 2 and r["skipped_update"] == 0 for r in read_jsonl(trainer.run_dir / "metrics.jsonl"))
    report = "\n".join(f"step {s}: rss {r:.1f} MB, {t} tensors, {o} objects, {b} blocks" for s, r, t, o, b in samples)
    steps, rss, tensors, objects, blocks = zip(*samples)
    assert max(rss) - rss[0] <= RSS_SLACK_MB, report
    assert max(tensors) - tensors[0] <= TENSOR_SLACK, report
    assert max(objects) - objects[0] <= OBJECT_SLACK, report
    assert (blocks[-1] - blocks[0]) / (steps[-1] - steps[0]) <= BLOCKS_PER_STEP, report
