"""Data parallelism (trainer/parallel/: FSDP2 sharding, group communication) on CPU: two torchrun ranks over gloo, FSDP2.

One torchrun launch of `distributed_worker.py` (2 processes) serves every two-rank test; the
single-process side runs here. What is proved:
- an RL step's updates on two ranks give the single process's gradients, parameters and
  metrics on the same global batch (the loss normaliser is global, gradients are summed, the
  LM head weight, tied to the embedding or not, is whole at loss time), to fp32 rounding: the
  two sides add the same numbers in different micro-batch groupings; the rollout engine then
  holds the whole new weights;
- each rank trains on exactly its `packing.balance` share, and ranks with fewer micro-batches
  pad with zero-weight ones (the first mini-batch is built to be uneven);
- rank 0 alone logs: metrics.jsonl once per step, one W&B run (offline);
- a checkpoint written by two ranks (DCP) resumes in one process with identical weights,
  optimizer state and reference, and a single-process checkpoint resumes on two ranks;
- in the batch-invariant mode (`algorithm.batch_invariant`) the old log-probs computed on two
  ranks, each its share, have the single process's bits;
- `prolix train --nproc G` builds the right torchrun command.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from distributed_worker import STEP, bitwise_old_logps, premade_records, run_updates
from trainer_testing import TESTS, as_jsonl_record, offline_runs, read_jsonl, tiny_overrides, wandb_importable
from transformers import AutoModelForCausalLM

from prolix.trainer.config import load_config, save_config
from prolix.trainer.loop import Trainer
from prolix.trainer.model import save_policy
from prolix.trainer.packing import attention_crossover, balance
from prolix.trainer.parallel import SingleProcess
from prolix.trainer.parallel.launch import torchrun_command
from prolix.trainer.train import build_parser, launch_command
from prolix.trainer.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
TIMEOUT_S = 180       # the worker takes ~12 s on 2 busy CPU cores
# fp32 on both sides; the sums differ only in order (other micro-batch groupings, a reduce-scatter)
RTOL, ATOL = 1e-5, 1e-7


def assert_tensors_close(got: dict, want: dict, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what} {name}: {m}")


def optimizer_state_by_name(trainer: Trainer) -> dict:
    names = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    return {names[i]: s for i, s in trainer.optimizer.state_dict()["state"].items()}


@pytest.fixture(scope="module")
def untied_model(base_model, tmp_path_factory):
    """The tiny model with an LM head of its own (tie_word_embeddings=False)."""
    out = tmp_path_factory.mktemp("untied") / "base_model"
    model = AutoModelForCausalLM.from_pretrained(base_model, tie_word_embeddings=False)
    torch.manual_seed(1)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    save_policy(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base_model / name).is_file():
            shutil.copy2(base_model / name, out / name)
    return out


@pytest.fixture(scope="module")
def single(base_model, untied_model, problems, tmp_path_factory):
    """The single-process side: the same step's updates with both models, and a checkpoint of
    the tied one's state after (its reference.safetensors stores the tied weight once)."""
    results = {}
    for name, model in (("untied", untied_model), ("tied", base_model)):
        out = tmp_path_factory.mktemp(f"single_{name}")
        cfg = load_config(None, tiny_overrides(model, problems, out, **STEP))
        (out / "run").mkdir()
        trainer = Trainer(cfg, out / "run")
        results[name] = run_updates(trainer, premade_records(trainer.policy.config.vocab_size))
        trainer.engine.close()
    trainer.state.step = 1
    save_config(cfg, out / "run" / "config.yaml")
    results["checkpoint"] = trainer.save()
    results["optim"] = optimizer_state_by_name(trainer)
    results["reference"] = {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    return results


@pytest.fixture(scope="module")
def two_ranks(single, base_model, untied_model, problems, tmp_path_factory):
    """Runs distributed_worker.py on 2 CPU ranks once; returns its output folder."""
    out = tmp_path_factory.mktemp("two_ranks")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_DIR", "WANDB_API_KEY")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",   # W&B: local files only
               **{var: str(out / "wandb_home") for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")})
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(TESTS / "distributed_worker.py"), str(out), str(base_model), str(untied_model), str(problems),
           str(single["checkpoint"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:         # a hang (mismatched collectives): torchrun stops its ranks on SIGTERM
        proc.terminate()
        _, stderr = proc.communicate()
        pytest.fail(f"the two ranks did not finish in {TIMEOUT_S} s:\n{stderr[-6000:]}")
    if proc.returncode != 0:                     # the ranks' tracebacks, without torchrun's summary
        ranks = [line for line in stderr.splitlines() if line.startswith("[rank")]
        lines = ranks[-150:] or stderr[-6000:].splitlines()
        pytest.fail(f"torchrun exited with {proc.returncode}:\n" + "\n".join(lines))
    return out


def test_batch_invariant_log_probs_have_the_same_bits_on_two_ranks(base_model, problems, two_ranks, tmp_path):
    dist = torch.load(two_ranks / "bitwise.pt", weights_only=False)
    single = bitwise_old_logps(base_model, problems, tmp_path)
    assert len(dist) == len(single) == len(premade_records(8))
    for d, s in zip(dist, single, strict=True):
        assert torch.equal(d.view(torch.int32), s.view(torch.int32))


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_two_ranks_take_the_single_process_step_on_the_same_batch(single, two_ranks, head):
    dist, single = torch.load(two_ranks / f"update_{head}.pt", weights_only=False), single[head]
    assert dist["world_size"] == WORLD
    for (old_d, ref_d), (old_s, ref_s) in zip(dist["logps"], single["logps"], strict=True):
        torch.testing.assert_close(old_d, old_s, rtol=RTOL, atol=1e-6)        # attach_logps on shares
        torch.testing.assert_close(ref_d, ref_s, rtol=RTOL, atol=1e-6)
    assert len(dist["grads"]) == len(single["grads"]) == 2
    for u, (g_d, g_s) in enumerate(zip(dist["grads"], single["grads"])):
        assert_tensors_close(g_d, g_s, f"gradient of update {u}")
    assert_tensors_close(dist["params"], single["params"], "parameter after the step")
    for s_d, s_s in zip(dist["stats"], single["stats"]):
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "ratio_mean", "ratio_max", "clip_frac"):
            assert s_d[key] == pytest.approx(s_s[key], rel=RTOL, abs=1e-7), key
    assert_tensors_close(dist["engine"], dist["params"], "rollout engine weight", rtol=0, atol=0)


def test_each_rank_packs_its_balance_share_and_pads_to_the_common_count(single, two_ranks, base_model):
    dist = torch.load(two_ranks / "update_tied.pt", weights_only=False)
    c = AutoModelForCausalLM.from_pretrained(base_model).config
    crossover = attention_crossover(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                    c.num_key_value_heads, getattr(c, "head_dim", None))
    lengths = [[46, 30, 25], [34, 16, 6, 25, 18]]          # the two mini-batches of premade_records
    for u, mini_batch in enumerate(lengths):
        shares = balance(mini_batch, WORLD, attention_crossover=crossover)
        plans = [dist["plans"][rank][u] for rank in range(WORLD)]
        for rank in range(WORLD):
            assert sorted(i for mb in plans[rank] for i in mb) == shares[rank], (u, rank, plans)
        assert len({len(p) for p in plans}) == 1, plans            # the same number of forward/backward
    first = [dist["plans"][rank][0] for rank in range(WORLD)]
    assert [] in first[0] + first[1], first                        # the uneven mini-batch was padded


def test_the_loop_runs_on_two_ranks_and_rank_zero_alone_logs(two_ranks):
    run = two_ranks / "b" / "run"
    lines = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in lines] == [0, 1, 2]                  # once per step, not once per rank
    for record in lines[1:]:
        for key in ("reward/mean", "loss", "kl", "grad_norm", "entropy"):
            assert isinstance(record.get(key), float) and math.isfinite(record[key]), (key, record)
        assert record["updates"] == 2 and record["batch/groups"] == 4     # the whole batch, not a share
    assert all(0 <= lines[step]["eval/score"] <= 1 for step in (0, 2))     # eval.every = 2
    assert lines[2]["reference/reset_reason"] == "every"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_the_loop_on_two_ranks_logs_one_wandb_run_from_rank_zero(two_ranks):
    if not wandb_importable():                       # not imported here: see test_sinks.wandb_env
        pytest.skip("wandb is not installed")

    run = two_ranks / "b" / "run"
    runs = offline_runs(run)
    assert len(runs) == 1                                          # not one per rank
    assert [as_jsonl_record(item) for item in runs[0][1]] == read_jsonl(run / "metrics.jsonl")


def test_checkpoint_of_two_ranks_resumes_in_one_process(two_ranks, tmp_path):
    run = two_ranks / "b" / "run"
    cfg = load_config(run / "config.yaml")
    for step in (1, 2):
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        saved = torch.load(two_ranks / f"saved_{step}.pt", weights_only=False)
        (tmp_path / f"resumed_{step}").mkdir()
        trainer = Trainer(cfg, tmp_path / f"resumed_{step}", resume_from=ckpt)
        assert isinstance(trainer.parallel, SingleProcess) and trainer.state.step == step
        params = {n: p.detach() for n, p in trainer.policy.named_parameters()}
        assert_tensors_close(params, saved["params"], f"step {step} weight", rtol=0, atol=0)
        reference = {n: p.detach() for n, p in trainer.reference.named_parameters()}
        assert_tensors_close(reference, saved["reference"], f"step {step} reference", rtol=0, atol=0)
        optim = optimizer_state_by_name(trainer)
        assert optim.keys() == saved["optim"].keys()
        for name in optim:
            assert_tensors_close(optim[name], saved["optim"][name], f"step {step} AdamW {name}", rtol=0, atol=0)
        trainer.engine.close()
        hf = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()        # the consolidated export
        for name, value in saved["params"].items():
            assert torch.equal(hf[name], value), name
    # step 2 reset the reference (reference.every = 2): a fresh optimizer, reference = policy
    assert saved["optim"] == {} and json.loads((ckpt / "trainer_state.json").read_text())["resets"][0]["step"] == 2
    assert_tensors_close(saved["reference"], saved["params"], "reset reference", rtol=0, atol=0)


def test_single_process_checkpoint_resumes_on_two_ranks(single, two_ranks):
    resumed = torch.load(two_ranks / "resumed.pt", weights_only=False)
    assert resumed["step"] == 1
    assert_tensors_close(resumed["params"], single["tied"]["params"], "weight", rtol=0, atol=0)
    assert_tensors_close(resumed["reference"], single["reference"], "reference", rtol=0, atol=0)
    assert resumed["optim"].keys() == single["optim"].keys() and resumed["optim"]
    for name, state in single["optim"].items():
        assert_tensors_close(resumed["optim"][name], state, f"AdamW {name}", rtol=0, atol=0)


def test_nproc_builds_the_torchrun_command():
    args = build_parser().parse_args(["--nproc", "4", "--config", "cfg.yaml", "optim.lr=1e-6", "rollout.n=8"])
    assert launch_command(args) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
        "-m", "prolix.trainer.cli", "train", "--config", "cfg.yaml", "optim.lr=1e-6", "rollout.n=8"]
    args = build_parser().parse_args(["--resume", "runs/x", "--nproc=2", "run.steps=10"])
    assert launch_command(args)[-5:] == ["prolix.trainer.cli", "train", "--resume", "runs/x", "run.steps=10"]
    with pytest.raises(ValueError, match="--nproc"):
        torchrun_command(0, [])


def test_nproc_inside_torchrun_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(["--nproc", "2"]) == 2
    assert "already one of a torchrun world" in capsys.readouterr().err
