"""The RL loop: one GRPO step in plain sight, plus validation and the ProRL reference reset.

One step (`Trainer.train_step`):

    groups  = collect_groups(step)        rollout → reward (+ overlong shaping) → group advantages,
                                          dynamic sampling refills the batch with informative groups
                                          (`rollout.Rollouts`; in the split placement the rollout
                                          ranks run it and the batch arrives)
    records = make_records(groups)        prompt+response ids, the advantage broadcast per token,
                                          the engine's log-probs (for TIS / rollout correction)
    records = attach_logps(records)       old_logp (no grad) when a rollout feeds > 1 update or
                                          rollout correction is on, ref_logp from the frozen
                                          reference when kl_coef > 0
    for mini_batch in mini_batches(records):
        update(mini_batch)                rollout correction over the mini-batch (kept counts) →
                                          pack → micro-batches → fused LM head + GRPO loss with the
                                          mini-batch's global normaliser → backward → clip → AdamW
    sync_weights()                        the rollout engine samples from the new weights

`Trainer.fit` wraps it: evaluate (pass@1 / pass@k on each source's held-out problems at T=0.6,
top-p 0.95), reset the reference when validation stagnated for `patience` evaluations, every
`reference.every` steps, or when RUN/RESET_REFERENCE appears; log; checkpoint.

Numerical guards (`guards.py`): an update whose loss is not finite stops before its backward,
one whose gradient norm is not finite before AdamW; either way the weights and the optimizer
state are left as they were, `skipped_update` counts it and a warning names the step. A step
none of whose updates was applied is a skipped step; `optim.max_consecutive_skips` of them in a
row raise `TrainingDivergedError` before anything is saved, so `latest` stays the last good
checkpoint. So do weights that an applied update left non-finite (checked after every AdamW
step with one fused reduction) and non-finite logits met by the torch sampler. Each phase runs
inside an NVTX range (`nvtx.py`: "prolix/rollout", ...; free without CUDA).

Deviations from textbook GRPO, all from the ProRL/DAPO recipe and all configurable:
token-mean aggregation over the whole mini-batch, clip-higher, dynamic sampling, a KL term
(k3) to a reference that is periodically reset, optional overlong penalty/masking.
Determinism: prompt draws come from one `random.Random` (checkpointed); each rollout call gets a
seed that is a function of (run.seed, step, try), so a resumed run samples what an
uninterrupted one would.

How the loop is run is `self.parallel` (`parallel.Parallel`), chosen once at start-up: one
process, FSDP2 under torchrun with every rank running this loop, or the trainer ranks of the
split placement. The loop calls its three parts directly: `comm` (broadcast, merge, reduce,
any-rank flags, the stop signal), `sharding` (prepare, micro-batch plan, forward, checkpoints)
and `batches` (the step's batch, weight sync); it never asks which ones it holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from prolix.kernels.rollout_correction import PREFIX as CORRECTION_PREFIX

from . import batching, checkpoint, nvtx
from .config import TrainConfig
from .data import Data, check_prompt_lengths, prepare_data
from .evaluation import heldout_metrics
from .guards import DivergenceGuard, NonFiniteLogitsError, TrainingDivergedError
from .metrics import (
    MetricsLogger,
    SilentLogger,
    peak_flops,
    policy_flops,
    reduce_updates,
    step_throughput,
)
from .model import frozen_copy, grpo_loss_from_hidden, head_inputs, load_policy, logprobs_from_hidden
from .optimizer import learning_rate, make_optimizer
from .packing import SequenceRecord, pack_microbatch
from .parallel import Parallel, UpdateStats, init_parallelism
from .preflight import policy_source
from .problem import Problem
from .rollout.rollouts import Group, Rollouts, rollout_seed
from .signals import RunStopped, StopRequest, close_run
from .tokenizer import load_tokenizer

__all__ = ["Group", "TrainerState", "TrainResult", "Trainer", "TrainingDivergedError"]


@dataclasses.dataclass
class TrainerState:
    """Everything of the loop that a checkpoint must carry (JSON-serialisable)."""

    step: int = 0
    sampler: Any = None                     # random.Random.getstate() of the prompt sampler
    best_score: float | None = None
    evals_since_best: int = 0
    resets: list[dict] = dataclasses.field(default_factory=list)
    first_eval: dict | None = None
    last_eval: dict | None = None
    consecutive_skips: int = 0              # steps in a row without an applied update (numerical guard)


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    first_eval: dict | None
    last_eval: dict | None
    steps: int


class Trainer:
    """Owns the policy, the reference, the optimizer, the engine and the loop state; runs the
    loop through `self.parallel`, which decides nothing about the algorithm."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, data: Data | None = None,
                 resume_from: str | Path | None = None, resume_verified: bool = False,
                 parallel: Parallel | None = None) -> None:
        """`resume_verified`: the caller has already checked `resume_from`'s manifest (as
        `checkpoint.resolve_checkpoint` does), so its files are not hashed a second time.
        `parallel`: how the loop runs; default `parallel.init_parallelism(cfg.run.device)`."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.parallel = parallel or init_parallelism(cfg.run.device)
        self.device = self.parallel.device
        self.param_dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
        wants_bf16 = cfg.model.autocast == "bf16" or (cfg.model.autocast == "auto" and self.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if wants_bf16 else None
        source = policy_source(cfg, resume_from, resume_verified)
        self.tokenizer = load_tokenizer(source)
        self.data = data or prepare_data(cfg)
        check_prompt_lengths(cfg, self.tokenizer, self.data)
        torch.manual_seed(cfg.run.seed)
        rollout_model = self._load_models(source)
        self.optimizer = make_optimizer(self.policy, self.cfg.optim)
        self.loss_config = cfg.loss_config()
        self.state = TrainerState()
        if resume_from:          # either format (plain or sharded), saved on any number of ranks
            saved = self.parallel.sharding.load_checkpoint(resume_from, policy=self.policy, optimizer=self.optimizer,
                                                           reference=self.reference, verify=False)   # verified
            self.state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
        engine = self.parallel.batches.engine_name(cfg.rollout.engine)          # split: the torch sampler
        self.rollouts = Rollouts.build(cfg, self.data.train, self.tokenizer, rollout_model, engine=engine,
                                       rollout=self.parallel.batches.rollout)
        self.engine = self.rollouts.engine
        self.bitwise_rollouts = cfg.algorithm.batch_invariant and engine == "torch"   # rollout logp = old logp
        if resume_from and self.state.sampler is not None:
            self.rollouts.rng.setstate(checkpoint.as_nested_tuples(self.state.sampler))
        logger = MetricsLogger if self.parallel.comm.is_main else SilentLogger
        self._step_end: float | None = None
        self.log = logger(self.run_dir, total_steps=cfg.run.steps, start_step=self.state.step,
                          tensorboard=cfg.run.tensorboard, progress=cfg.run.progress, plot=cfg.run.plot,
                          config=cfg)
        self.guard = DivergenceGuard(self.parallel.comm.any_rank, lambda: checkpoint.latest_checkpoint(self.run_dir),
                                     cfg.optim.max_consecutive_skips)
        peak = peak_flops(self.device)
        self._peak = peak * self.parallel.comm.world_size if peak else None    # MFU per GPU of the whole world

    def _load_models(self, source: Path) -> torch.nn.Module:
        """The policy and (kl_coef > 0) its frozen reference, prepared by the sharding; returns
        the model the rollout engine samples from (chosen before the policy is sharded)."""
        cfg = self.cfg
        invariant = cfg.algorithm.batch_invariant
        self.policy = load_policy(source, dtype=self.param_dtype, device=self.parallel.sharding.load_device,
                                  gradient_checkpointing=cfg.model.gradient_checkpointing,
                                  liger=False if invariant else None)          # Liger's kernels bypass the mode
        cfg.check_model_context(getattr(self.policy.config, "max_position_embeddings", None))
        self.reference = frozen_copy(self.policy, self.compute_dtype) if cfg.algorithm.loss.kl_coef > 0 else None
        stock = functools.partial(head_inputs, attn_backend=cfg.model.attn_backend, compute_dtype=self.compute_dtype)

        def forward(model, batch):
            return stock(model, batch, batch_invariant=self._invariant(model))

        rollout_model = self.parallel.batches.engine_model(self.policy)
        self.parallel.sharding.prepare(self.policy, self.reference, forward, compute_dtype=self.compute_dtype)
        return rollout_model

    def _plan(self, records: list[SequenceRecord]) -> list[list[int]]:
        """This process's micro-batches (indices into records; [] a zero-weight one)."""
        return self.parallel.sharding.plan([r.length for r in records], self.cfg.optim.max_tokens_per_microbatch)

    def _pack(self, records: list[SequenceRecord], idx: list[int]):
        return pack_microbatch(records, idx).to(self.device)

    def prompt_ids(self, problem: Problem) -> list[int]:
        return self.rollouts.prompt_ids(problem)

    # ------------------------------------------------------------------ the loop

    def fit(self, stop: StopRequest | None = None) -> TrainResult:
        """Train until run.steps; evaluate, reset, log and checkpoint along the way. When `stop`
        (signals.py) reports a signal, the step in progress finishes, is logged and checkpointed,
        and `RunStopped` is raised."""
        try:
            self.parallel.batches.begin(self.state.step, self.rollouts, self.policy)   # split: rollout ranks start
            if self.state.first_eval is None and self.cfg.eval.at_start:
                self.state.first_eval = self.state.last_eval = self.evaluate()
                self._track_validation(self.state.first_eval["eval/score"])
                self.log.log(0, self.state.first_eval)
            self._check_stop(stop, saved=checkpoint.latest_checkpoint(self.run_dir))   # resumed: saved
            while self.state.step < self.cfg.run.steps:
                self._check_stop(stop, saved=self._step_and_after())
        except BaseException as e:
            close_run(self.log, self.engine, self.rollouts.pool, failure=e)
            if isinstance(e, NonFiniteLogitsError):
                raise self.guard.error(f"after step {self.state.step}: {e}") from None
            raise
        close_run(self.log, self.engine, self.rollouts.pool)
        return TrainResult(self.run_dir, self.state.first_eval, self.state.last_eval, self.state.step)

    def _step_and_after(self) -> Path | None:
        """One step, then its evaluation, reference reset, log line and checkpoint (the path
        saved, or None). Only scheduled evaluations (eval.every) count toward
        reference.patience: a run stopped and resumed resets where an uninterrupted one does."""
        cfg = self.cfg
        metrics = self.train_step()
        step = self.state.step
        scheduled = bool(cfg.eval.every) and step % cfg.eval.every == 0
        if scheduled or step == cfg.run.steps:
            self.state.last_eval = self.evaluate()
            self.state.first_eval = self.state.first_eval or self.state.last_eval
            metrics.update(self.state.last_eval)
            if scheduled:
                self._track_validation(self.state.last_eval["eval/score"])
        reason = self.reset_reason(step, scheduled)
        if reason:
            self.reset_reference(reason)
            metrics["reference/reset_reason"] = reason
        metrics["reference/resets"] = len(self.state.resets)
        self.log.log(step, metrics)
        if step == cfg.run.steps or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
            return self.save()
        return None

    def _check_stop(self, stop: StopRequest | None, *, saved: Path | None) -> None:
        """Raise RunStopped when any rank got a stop signal, after checkpointing the completed
        step (unless just saved)."""
        signum = self.parallel.comm.stop_signal(stop.signum if stop is not None else None)
        if signum is None:
            return
        if saved is None and self.state.step > 0:
            saved = self.save()
        raise RunStopped(signum, self.state.step, saved)

    def train_step(self) -> dict[str, float]:
        """One RL step: rollout → reward → advantage → pack → loss → AdamW → sync. Returns metrics."""
        step = self.state.step + 1
        t0 = time.perf_counter()
        t_start = self._step_end or t0
        groups, metrics = self.collect_groups(step)                  # rollout, reward, advantage, refill
        t_rollout = time.perf_counter() - t0
        records = self.make_records(groups)                          # per-token advantage, rollout logp
        t1 = time.perf_counter()
        records, logp_metrics = self.attach_logps_at(records, step)  # old_logp, ref_logp (no grad)
        stats = [self.update(mb, step) for mb in self.mini_batches(records, step)]   # pack, loss, step
        self._track_skips(step, stats)                                # raises after too many skipped steps
        with nvtx.range("weight_sync"):
            self._sync_weights()                                      # rollout engine ← new weights
        t_train = time.perf_counter() - t1
        self.state.step = step
        metrics.update(reduce_updates(stats))
        metrics.update(logp_metrics)
        metrics["consecutive_skips"] = self.state.consecutive_skips
        metrics.update(self._throughput(metrics, records, t_rollout, t_train))
        self._step_end = time.perf_counter()
        metrics["perf/step_s"] = self._step_end - t_start
        return metrics

    def collect_groups(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """The step's groups and rollout metrics (`Rollouts.collect_groups`: rollout, reward,
        advantage, dynamic-sampling refill), sampled here or, in the split placement, received
        from the rollout ranks."""
        return self.parallel.batches.collect(step, self.rollouts)

    def _sync_weights(self) -> None:
        self.parallel.batches.sync_engine(self.engine, self.policy)   # under FSDP: gathered from the shards

    def make_records(self, groups: list[Group]) -> list[SequenceRecord]:
        return batching.make_records(groups, self.loss_config, self.cfg.algorithm.overlong,
                                     keep_rollout_logp=self.cfg.algorithm.batch_invariant)

    def mini_batches(self, records: list[SequenceRecord], step: int) -> list[list[SequenceRecord]]:
        """The step's updates: optim.mini_batch_prompts prompts each, optim.epochs passes."""
        seed = lambda epoch: rollout_seed(self.cfg.run.seed, step, 1000 + epoch)
        return batching.mini_batches(records, epochs=self.cfg.optim.epochs, prompts=self.cfg.optim.mini_batch_prompts,
                                     shuffle_seed=seed)

    def _invariant(self, model) -> bool:
        """Whether `model` runs batch-invariant: the policy when algorithm.batch_invariant is on, never
        the reference (its log-probs enter only the KL penalty; the stock operators cost half)."""
        return self.cfg.algorithm.batch_invariant and model is not self.reference

    def _logps(self, model, batch) -> torch.Tensor:
        """[N] fp32 log-probs of the packed targets under `model` at the rollout temperature."""
        hidden, weight = self.parallel.sharding.forward(model, batch)
        return logprobs_from_hidden(hidden, weight, batch, temperature=self.cfg.rollout.temperature,
                                    kernel_backend=self.cfg.model.kernel_backend, batch_invariant=self._invariant(model))

    def attach_logps(self, records: list[SequenceRecord]) -> list[SequenceRecord]:
        """`attach_logps_at` outside any step's schedule (no on-policy verification)."""
        return self.attach_logps_at(records, None)[0]

    @torch.no_grad()
    def attach_logps_at(self, records: list[SequenceRecord], step: int | None,
                        ) -> tuple[list[SequenceRecord], dict[str, float]]:
        """old_logp from the policy before any update of this step (needed when the rollout
        feeds several updates, and by rollout correction, which counts the tokens it keeps
        before the loss; otherwise old = logp.detach() and the ratio is 1), and ref_logp from
        the frozen reference (when kl_coef > 0). Both are constants of the loss.

        Bitwise on-policy (algorithm.batch_invariant with the torch sampler): the rollout's
        log-probs are the old ones, so no forward computes them, except at every
        algorithm.verify_on_policy_every-th step. Whenever the trainer computes old log-probs
        and the records hold the rollout's, returns {"rollout/logp_diff_max": max |rollout − old|}."""
        alg = self.cfg.algorithm
        verify = alg.batch_invariant and step is not None and step % alg.verify_on_policy_every == 0
        need_old = self.cfg.optim.updates_per_rollout > 1 or self.loss_config.corrects_rollout or verify
        compute_old = need_old and (verify or not self.bitwise_rollouts)
        if records and self.bitwise_rollouts and not compute_old:
            records = [dataclasses.replace(r, old_logp=r.rollout_logp) for r in records]
        if records and (compute_old or self.reference is not None):
            records = self._forward_logps(records, compute_old)
        metrics = {}
        if compute_old and records and records[0].rollout_logp is not None:
            metrics["rollout/logp_diff_max"] = batching.logp_diff_max(records)
        if alg.batch_invariant and not (self.loss_config.tis_cap is not None or self.loss_config.corrects_rollout):
            records = [dataclasses.replace(r, rollout_logp=None) for r in records]      # the loss does not use them
        return records, metrics

    def _forward_logps(self, records: list[SequenceRecord], old: bool) -> list[SequenceRecord]:
        """Attach old_logp (when `old`) and ref_logp (with a reference) from no-grad forwards over
        this process's micro-batches, merged across ranks."""
        olds: list[Any] = [None] * len(records) if old else [r.old_logp for r in records]
        ref: list[Any] = [None] * len(records)
        models = [(m, out) for m, out in ((self.policy if old else None, olds), (self.reference, ref)) if m]
        with nvtx.range("logprobs"):
            for idx in self._plan(records):
                batch = self._pack(records, idx)
                for model, out in models:
                    for i, values in zip(idx, batch.split_responses(self._logps(model, batch))):
                        out[i] = values.float().cpu()
        if old:
            olds = self.parallel.comm.merge(olds)
        ref = self.parallel.comm.merge(ref)                              # each rank filled its share
        return [dataclasses.replace(r, old_logp=olds[i], ref_logp=ref[i]) for i, r in enumerate(records)]

    def _loss(self, batch, normalizer: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy's GRPO loss on one packed micro-batch (decoder, then the fused LM head)."""
        hidden, weight = self.parallel.sharding.forward(self.policy, batch)
        return grpo_loss_from_hidden(hidden, weight, batch, config=self.loss_config, normalizer=normalizer,
                                     kernel_backend=self.cfg.model.kernel_backend, entropy_metric=True,
                                     batch_invariant=self.cfg.algorithm.batch_invariant)

    def update(self, records: list[SequenceRecord], step: int) -> dict[str, float]:
        """One optimizer step on a mini-batch: micro-batches planned by token budget, each loss
        normalised by the whole mini-batch's denominator. A non-finite loss or gradient norm
        skips the AdamW step (weights and optimizer state unchanged, `skipped_update` = 1)."""
        self.policy.train()
        correction = batching.correction(records, self.loss_config)
        self.optimizer.zero_grad(set_to_none=True)
        stats, skip = self._accumulate(records, batching.normalizer(records, correction, self.loss_config))
        stats = self.parallel.comm.reduce_update(stats)               # this rank's share → the mini-batch
        grad_norm, skip, lr = self._optimizer_step(step, skip)
        if skip is not None:
            self.log.write(f"step {step}: warning: {skip}; update skipped, weights unchanged")
        self.policy.eval()
        out = {k: v / max(stats.tokens, 1.0) for k, v in stats.sums.items()}
        out.update(stats.extremes)
        out.update(loss=stats.loss, grad_norm=grad_norm, lr=lr, skipped_update=float(skip is not None),
                   **(correction.metrics if correction is not None else {}))
        return out

    def _accumulate(self, records: list[SequenceRecord], normalizer: float) -> tuple[UpdateStats, str | None]:
        """Forward + backward of this process's micro-batches; returns the metric sums and why the
        update must be skipped (None: it may be applied). Each loss is read before its backward,
        so a NaN never reaches the gradients; under `comm.lockstep` (FSDP) the backward runs
        anyway (a collective), the NaN reaches the global gradient norm, and all ranks skip."""
        stats, skip = UpdateStats(), None
        for idx in self._plan(records):
            with nvtx.range("pack"):
                batch = self._pack(records, idx)
            with nvtx.range("forward"):
                loss, m = self._loss(batch, normalizer)
            loss_value = loss.item()
            stats.loss += loss_value
            if not math.isfinite(loss_value):
                skip = f"non-finite loss ({loss_value})"
                if not self.parallel.comm.lockstep:
                    break
            with nvtx.range("backward"):
                loss.backward()
            stats.add({k: v.item() for k, v in m.items()   # correction metrics: the mini-batch's, in update
                       if k != "num_tokens" and not k.startswith(CORRECTION_PREFIX)}, m["num_tokens"].item())
        return stats, skip

    def _optimizer_step(self, step: int, skip: str | None) -> tuple[float, str | None, float]:
        """Clip and apply the accumulated gradients unless `skip`; returns (gradient norm before
        clipping, NaN when not computed; why the update was skipped or None; the lr)."""
        lr = learning_rate(step, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = float("nan")
        with nvtx.range("optimizer"):
            if skip is None or self.parallel.comm.lockstep:          # the norm is a collective under FSDP
                clip = self.cfg.optim.grad_clip or float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip).item()
                if not math.isfinite(grad_norm) and skip is None:
                    skip = f"non-finite gradient norm ({grad_norm})"
            if skip is None:
                self.optimizer.step()
                self._check_weights(step, lr)                       # before anything can save them
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skip, lr

    def _check_weights(self, step: int, lr: float) -> None:
        """Non-finite weights after an update (a finite but far too large lr makes them from
        finite gradients) stop the run before anything can save them."""
        self.guard.check_finite(self.policy.parameters(), f"step {step}: the weights are not finite after the "
                                f"optimizer update (optim.lr={lr:g})")

    @torch.no_grad()
    def _check_outputs(self) -> None:
        """Non-finite log-probs on one held-out prompt stop the run before a checkpoint: weights
        can be finite and still overflow the forward (optim.lr=1e20 leaves them near 1e20:
        RMSNorm's mean square is inf). One forward of one short sequence."""
        problems = next(iter(self.data.heldout.values()), None) or \
            self.data.train.sample(1, random.Random(self.cfg.run.seed + 3))      # its own rng
        ids = self.prompt_ids(problems[0])
        if len(ids) < 2:
            return
        batch = self._pack([SequenceRecord(token_ids=ids, response_start=1, advantage=0.0)], [0])
        lr = learning_rate(self.state.step, self.cfg.optim)
        self.guard.check_finite([self._logps(self.policy, batch)], f"step {self.state.step}: the policy's log-probs "
                                f"are not finite (its weights overflow the forward; optim.lr={lr:g})")

    def _track_skips(self, step: int, stats: list[dict[str, float]]) -> None:
        self.state.consecutive_skips, warning = self.guard.track_skips(
            self.state.consecutive_skips, step, [bool(s["skipped_update"]) for s in stats])
        if warning:
            self.log.write(warning)

    def _throughput(self, metrics: dict, records: list[SequenceRecord], t_rollout: float, t_train: float) -> dict:
        lengths, o = [r.length for r in records], self.cfg.optim
        out = step_throughput(metrics, lengths, t_rollout, t_train, o.epochs)
        if self._peak and records:     # MFU: fwd + bwd per epoch, and one no-grad forward each for old / ref logp
            passes = 3.0 * o.epochs + (o.updates_per_rollout > 1) + (self.reference is not None)
            out["perf/mfu"] = policy_flops(self.policy, lengths, passes=passes) / (t_train * self._peak)
        return out

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`evaluation.heldout_metrics` at the eval section's sampling, seeded by run.seed alone:
        every evaluation sees the same random numbers, and `prolix eval RUN --seed <run.seed>`
        samples what this one does."""
        with nvtx.range("eval"):
            return heldout_metrics(self.engine, self.data.heldout, self.prompt_ids, self.cfg.eval,
                                   seed=self.cfg.run.seed, max_tokens=self.cfg.eval_max_tokens,
                                   score=self.rollouts.pool.score)

    def _track_validation(self, value: float) -> None:
        best = self.state.best_score
        if best is None or value > best + self.cfg.reference.min_improvement:
            self.state.best_score, self.state.evals_since_best = value, 0
        else:
            self.state.evals_since_best += 1

    # ------------------------------------------------------------------ reference reset

    def reset_reason(self, step: int, evaluated: bool) -> str | None:
        """Why the reference should be reset after `step`, or None. The watch file is consumed
        by the first rank, which decides for all."""
        r = self.cfg.reference
        reasons = []
        watch = self.run_dir / r.watch_file
        if self.parallel.comm.is_main and watch.exists():
            watch.unlink(missing_ok=True)
            reasons.append("on_demand")
        if r.mode in ("every", "both") and step % r.every == 0:
            reasons.append("every")
        if r.mode in ("patience", "both") and evaluated and self.state.evals_since_best >= r.patience:
            reasons.append("patience")
        return self.parallel.comm.broadcast("+".join(reasons) or None)

    def reset_reference(self, reason: str) -> None:
        """The ProRL reset: reference ← policy, and (ProRL v1) a fresh optimizer state."""
        if self.reference is not None:
            self.reference.load_state_dict(self.policy.state_dict())
        if self.cfg.reference.reset_optimizer:
            self.optimizer = make_optimizer(self.policy, self.cfg.optim)
        self.state.evals_since_best = 0
        self.state.resets.append({"step": self.state.step, "reason": reason})
        self.log.write(f"step {self.state.step}: reference reset ({reason}); "
                       f"optimizer state {'cleared' if self.cfg.reference.reset_optimizer else 'kept'}")

    def save(self) -> Path:
        self.state.sampler = self.rollouts.rng.getstate()
        with nvtx.range("checkpoint"):
            self._check_outputs()                                   # nothing that cannot sample is saved
            return self.parallel.sharding.save_checkpoint(
                self.run_dir, self.state.step, policy=self.policy, tokenizer=self.tokenizer,
                optimizer=self.optimizer, reference=self.reference, trainer_state=dataclasses.asdict(self.state),
                keep_last=self.cfg.run.keep_last, tokenizer_source=self.cfg.model.path)
