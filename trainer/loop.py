"""The RL loop: one GRPO step in plain sight, plus validation and the ProRL reference reset.

One step (`Trainer.train_step`):

    groups  = collect_groups(step)        rollout → reward (+ overlong shaping) → group advantages,
                                          dynamic sampling refills the batch with informative groups
                                          (`rollouts.Rollouts`; in the split placement the rollout
                                          ranks run it and the batch arrives: `parallel.collect`)
    records = make_records(groups)        prompt+response ids, the advantage broadcast per token,
                                          the engine's log-probs (for TIS / rollout correction)
    records = attach_logps(records)       old_logp (no grad) when a rollout feeds > 1 update or
                                          rollout correction is on, ref_logp from the frozen
                                          reference when kl_coef > 0
    for mini_batch in mini_batches(records):
        update(mini_batch)                rollout correction over the mini-batch (kept counts) →
                                          pack → micro-batches → fused LM head + GRPO loss with the
                                          mini-batch's global normaliser → backward → clip → AdamW
    engine.sync_weights(policy)           the rollout engine samples from the new weights

`Trainer.fit` wraps it: evaluate (pass@1 / pass@k on each source's held-out problems at T=0.6,
top-p 0.95), reset the reference when validation stagnated for `patience` evaluations, every
`reference.every` steps, or when RUN/RESET_REFERENCE appears; log; checkpoint.

Numerical guards: an update whose loss is not finite stops before its backward, one whose
gradient norm is not finite before AdamW; either way the weights and the optimizer state are
left as they were, `skipped_update` counts it and a warning names the step. A step none of whose
updates was applied is a skipped step; `optim.max_consecutive_skips` of them in a row raise
`TrainingDivergedError` before anything is saved, so `latest` stays the last good checkpoint.
So do weights that an applied update left non-finite (checked after every AdamW step with one
fused reduction, `guards.all_finite`: a finite but far too large lr does this from finite
gradients) and non-finite logits met by the torch sampler.
Each phase runs inside an NVTX range (`nvtx.py`: "prolix/rollout", ...; free without CUDA).

Deviations from textbook GRPO, all from the ProRL/DAPO recipe and all configurable:
token-mean aggregation over the whole mini-batch, clip-higher, dynamic sampling, a KL term
(k3) to a reference that is periodically reset, optional overlong penalty/masking.
Determinism: prompt draws come from one `random.Random` (checkpointed); each rollout call gets a
seed that is a function of (run.seed, step, try), so a resumed run samples what an
uninterrupted one would.

How the loop is run is one object, `self.parallel` (parallel.py), chosen once at start-up:
`SingleProcess`, or under torchrun `distributed.DataParallel` (FSDP2), every rank running this
loop, or the trainer ranks of the split placement (`split.SplitTrainer`, rollout ranks apart).
The loop calls it at the same places whichever it is — the start, the step's batch, rollout,
micro-batch plan, forward, merging per-record results, reducing an update's statistics, weight
sync, the reset decision, non-finite weights or log-probs (`any_rank`), a stop signal
(`stop_signal`), checkpoints — and never asks which one it holds. A packed micro-batch reaches the loss by one path: `parallel.plan`
→ `packing.pack_microbatch` → `parallel.forward` (`model.head_inputs`) →
`model.grpo_loss_from_hidden`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from prolix.kernels.rollout_correction import PREFIX as CORRECTION_PREFIX
from prolix.kernels.rollout_correction import kept_counts, rollout_correction

from . import checkpoint, nvtx
from .config import ConfigError, TrainConfig
from .engines import SamplingConfig, make_engine
from .guards import NonFiniteLogitsError, all_finite
from .metrics import MetricsLogger, SilentLogger, is_extreme, merge_extremes, pass_at_k, peak_flops, train_flops
from .model import grpo_loss_from_hidden, head_inputs, load_policy, logprobs_from_hidden
from .packing import SequenceRecord, pack_microbatch
from .parallel import Parallelism, UpdateStats, init_parallelism
from .preflight import check_model_path
from .problem import Problem, ProblemSource
from .rewards import RewardPool, pop_reward_errors, score
from .rollouts import Group, Rollouts, rollout_seed
from .signals import RunStopped, StopRequest, close_run
from .tasks import MixedSource, make_source
from .tokenizer import format_prompt, load_tokenizer

__all__ = ["Data", "Group", "TrainerState", "TrainResult", "Trainer", "TrainingDivergedError", "prepare_data",
           "load_tokenizer", "pass_at_k"]

EVAL_SEED_OFFSET = 7_777_777   # evaluations reuse one seed: every eval sees the same random numbers


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    """The run's prompt sources: one sampler for training, held-out problems per source."""

    train: ProblemSource
    heldout: dict[str, list[Problem]]


def prepare_data(cfg: TrainConfig) -> Data:
    """Build every source (unknown tasks, missing files or fields raise ConfigError here)."""
    sources = []
    for i, source_cfg in enumerate(cfg.data.sources):
        try:
            sources.append(make_source(source_cfg))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"data.sources[{i}] ({source_cfg.name or source_cfg.path}): {e}") from None
    train = sources[0] if len(sources) == 1 else MixedSource(sources, [c.weight for c in cfg.data.sources])
    heldout: dict[str, list[Problem]] = {}
    for i, source in enumerate(sources):
        name = source.name if source.name not in heldout else f"{source.name}_{i}"
        problems = source.heldout()[: cfg.eval.heldout_size]
        if problems:
            heldout[name] = problems
    return Data(train=train, heldout=heldout)


def check_prompt_lengths(cfg: TrainConfig, tokenizer, data: Data) -> None:
    """Every held-out prompt and a sample of training prompts fit rollout.max_prompt_tokens."""
    probe = data.train.sample(32, random.Random(cfg.run.seed + 1))     # its own rng: training draws untouched
    for problem in probe + [p for ps in data.heldout.values() for p in ps]:
        length = len(format_prompt(tokenizer, problem.prompt, cfg.data.system_prompt))
        if length > cfg.rollout.max_prompt_tokens:
            raise ConfigError(f"rollout.max_prompt_tokens: a {problem.task!r} prompt has {length} tokens, more than "
                              f"{cfg.rollout.max_prompt_tokens}: {problem.prompt[:80]!r}...")


# ----------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class MiniBatchCorrection:
    """Rollout correction over one mini-batch (`Trainer._correction`)."""

    tokens: float                  # response tokens it keeps: token-mean's global normaliser
    sequences: float               # sequences with a kept token: the seq-* aggregations' normaliser
    metrics: dict[str, float]      # "rollout_corr/..." over the whole mini-batch


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


class TrainingDivergedError(RuntimeError):
    """optim.max_consecutive_skips steps in a row had no finite update; the run stopped unsaved."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    first_eval: dict | None
    last_eval: dict | None
    steps: int


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Owns the policy, the reference, the optimizer, the engine and the loop state; runs the
    loop through `self.parallel` (parallel.py), which decides nothing about the algorithm."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, data: Data | None = None,
                 resume_from: str | Path | None = None, resume_verified: bool = False,
                 parallel: Parallelism | None = None) -> None:
        """`resume_verified`: the caller has already checked `resume_from`'s manifest (as
        `checkpoint.resolve_checkpoint` does), so its files are not hashed a second time.
        `parallel`: how the loop runs; default `parallel.init_parallelism(cfg.run.device)`."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.parallel = parallel or init_parallelism(cfg.run.device)
        self.device = self.parallel.device
        self.param_dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
        wants_bf16 = cfg.model.autocast == "bf16" or (cfg.model.autocast == "auto" and self.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if wants_bf16 else None
        source = Path(resume_from) if resume_from else Path(cfg.model.path)
        if not cfg.model.path and not resume_from:
            raise ConfigError("model.path: empty (the demo builds its model before the trainer starts)")
        if not resume_from:
            check_model_path(cfg.model.path)           # one line naming model.path, not a Hub error
        if resume_from and not resume_verified:
            checkpoint.verify_checkpoint(resume_from)      # before any of its files is read

        self.tokenizer = load_tokenizer(source)
        self.data = data or prepare_data(cfg)
        check_prompt_lengths(cfg, self.tokenizer, self.data)
        torch.manual_seed(cfg.run.seed)
        rollout_model = self._load_models(source)
        self.optimizer = self._make_optimizer()
        self.loss_config = cfg.loss_config()
        self.state = TrainerState()
        saved_sampler = None
        if resume_from:          # either format (single-process or DCP), saved on any number of ranks
            saved = self.parallel.load_checkpoint(resume_from, policy=self.policy, optimizer=self.optimizer,
                                                  reference=self.reference, verify=False)   # verified above
            self.state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
            saved_sampler = checkpoint.as_nested_tuples(self.state.sampler)
        engine = self.parallel.engine_name(cfg.rollout.engine)      # split: the torch sampler, to evaluate
        self.engine = make_engine(engine, rollout_model, self.tokenizer, max_model_len=cfg.rollout.max_model_len,
                                  seed=cfg.run.seed, **(cfg.rollout.engine_options if engine == cfg.rollout.engine
                                                         else {}))
        self.rollouts = Rollouts(cfg, self.data.train, self.tokenizer, self.engine, rollout=self.parallel.rollout,
                                 pool=RewardPool(cfg.rollout.reward_workers))
        if saved_sampler is not None:
            self.rollouts.rng.setstate(saved_sampler)
        logger = MetricsLogger if self.parallel.is_main else SilentLogger
        self._step_end: float | None = None
        self.log = logger(self.run_dir, total_steps=cfg.run.steps, start_step=self.state.step,
                          tensorboard=cfg.run.tensorboard, progress=cfg.run.progress, config=cfg)
        peak = peak_flops(self.device)
        self._peak = peak * self.parallel.world_size if peak else None    # MFU per GPU of the whole world

    # ------------------------------------------------------------------ setup helpers

    def _load_models(self, source: Path) -> torch.nn.Module:
        """The policy and (kl_coef > 0) its frozen reference, prepared by the parallelism (sharded
        under FSDP); returns the model the rollout engine samples from."""
        cfg = self.cfg
        self.policy = load_policy(source, dtype=self.param_dtype, device=self.parallel.load_device,
                                  gradient_checkpointing=cfg.model.gradient_checkpointing)
        cfg.check_model_context(getattr(self.policy.config, "max_position_embeddings", None))
        self.reference = self._frozen_copy() if cfg.algorithm.loss.kl_coef > 0 else None
        forward = functools.partial(head_inputs, attn_backend=cfg.model.attn_backend,
                                    compute_dtype=self.compute_dtype)
        return self.parallel.prepare(self.policy, self.reference, forward, compute_dtype=self.compute_dtype)

    def _frozen_copy(self) -> torch.nn.Module:
        ref = copy.deepcopy(self.policy)
        if self.compute_dtype is not None:
            ref.to(self.compute_dtype)         # only ever run forward: store it in the compute dtype
        ref.eval().requires_grad_(False)
        return ref

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def _lr(self, step: int) -> float:
        o = self.cfg.optim
        return o.lr * min(1.0, step / o.warmup_steps) if o.warmup_steps else o.lr

    def _plan(self, records: list[SequenceRecord]) -> list[list[int]]:
        """Micro-batches (indices into records) that this process runs: all of them, or under
        data parallelism its balanced share, padded with [] to the common count."""
        return self.parallel.plan([r.length for r in records], self.cfg.optim.max_tokens_per_microbatch)

    def _pack(self, records: list[SequenceRecord], idx: list[int]):
        """The micro-batch `idx` on the device; [] is a zero-weight one (see `_plan`)."""
        return pack_microbatch(records, idx).to(self.device)

    @property
    def rng(self) -> random.Random:
        """The prompt sampler's generator (its state is the checkpoint's `sampler`)."""
        return self.rollouts.rng

    def prompt_ids(self, problem: Problem) -> list[int]:
        return self.rollouts.prompt_ids(problem)

    def _seed(self, step: int, attempt: int) -> int:
        return rollout_seed(self.cfg.run.seed, step, attempt)

    # ------------------------------------------------------------------ the loop

    def fit(self, stop: StopRequest | None = None) -> TrainResult:
        """Train until run.steps; evaluate, reset, log and checkpoint along the way.

        `stop` (signals.py): when it reports a signal, the step in progress finishes, is logged
        and checkpointed, and `RunStopped` is raised. Only scheduled evaluations (eval.every)
        count toward reference.patience; the one after the last step does not, so a run stopped
        and resumed resets the reference where an uninterrupted run does."""
        cfg = self.cfg
        try:
            self.parallel.begin(self.state.step, self.rollouts, self.policy)   # split: rollout ranks start
            if self.state.first_eval is None and cfg.eval.at_start:
                self.state.first_eval = self.state.last_eval = self.evaluate()
                self._track_validation(self.state.first_eval["eval/score"])
                self.log.log(0, self.state.first_eval)
            self._check_stop(stop, saved=checkpoint.latest_checkpoint(self.run_dir))   # resumed: saved
            while self.state.step < cfg.run.steps:
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
                saved = None
                if step == cfg.run.steps or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
                    saved = self.save()
                self._check_stop(stop, saved=saved)
        except NonFiniteLogitsError as e:
            close_run(self.log, self.engine, self.rollouts.pool, failure=e)
            raise self._diverged(f"after step {self.state.step}: {e}") from None
        except BaseException as e:
            close_run(self.log, self.engine, self.rollouts.pool, failure=e)
            raise
        close_run(self.log, self.engine, self.rollouts.pool)
        return TrainResult(self.run_dir, self.state.first_eval, self.state.last_eval, self.state.step)

    def _check_stop(self, stop: StopRequest | None, *, saved: Path | None) -> None:
        """Raise RunStopped when a stop was requested (on any rank): after checkpointing the
        completed step unless it was just saved; before the first step there is nothing to save."""
        signum = self.parallel.stop_signal(stop.signum if stop is not None else None)
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
        records = self.attach_logps(records)                         # old_logp, ref_logp (no grad)
        stats = [self.update(mb, step) for mb in self.mini_batches(records, step)]   # pack, loss, step
        self._track_skips(step, stats)                                # raises after too many skipped steps
        with nvtx.range("weight_sync"):
            self._sync_weights()                                      # rollout engine ← new weights
        t_train = time.perf_counter() - t1
        self.state.step = step
        metrics.update(self._reduce(stats))
        metrics["consecutive_skips"] = self.state.consecutive_skips
        metrics.update(self._throughput(metrics, records, t_rollout, t_train))
        self._step_end = time.perf_counter()
        metrics["perf/step_s"] = self._step_end - t_start
        return metrics

    # ------------------------------------------------------------------ rollout

    def collect_groups(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """The step's groups and rollout metrics (`Rollouts.collect_groups`: rollout, reward,
        advantage, dynamic-sampling refill), sampled here or, in the split placement, received
        from the rollout ranks (`parallel.collect`)."""
        return self.parallel.collect(step, self.rollouts)

    def _sync_weights(self) -> None:
        self.parallel.sync_engine(self.engine, self.policy)          # under FSDP: gathered from the shards

    def make_records(self, groups: list[Group]) -> list[SequenceRecord]:
        """One SequenceRecord per completion: the advantage is broadcast over its response by
        `pack`; overlong="mask" leaves truncated responses out of the loss (DAPO)."""
        use_rollout_logp = self.loss_config.tis_cap is not None or self.loss_config.corrects_rollout
        records = []
        for group in groups:
            for c, adv in zip(group.completions, group.advantages.tolist()):
                if not c.response_ids or (self.cfg.algorithm.overlong == "mask" and not c.finished):
                    continue
                records.append(SequenceRecord(
                    token_ids=list(c.prompt_ids) + list(c.response_ids), response_start=len(c.prompt_ids),
                    advantage=adv, rollout_logp=list(c.response_logprobs) if use_rollout_logp else None))
        return records

    # ------------------------------------------------------------------ update

    def _logps(self, model, batch) -> torch.Tensor:
        """[N] fp32 log-probs of the packed targets under `model` at the rollout temperature."""
        hidden, weight = self.parallel.forward(model, batch)
        return logprobs_from_hidden(hidden, weight, batch, temperature=self.cfg.rollout.temperature,
                                    kernel_backend=self.cfg.model.kernel_backend)

    @torch.no_grad()
    def attach_logps(self, records: list[SequenceRecord]) -> list[SequenceRecord]:
        """old_logp from the policy before any update of this step (needed when the rollout
        feeds several updates, and by rollout correction; otherwise old = logp.detach() and the
        ratio is 1), and ref_logp from the frozen reference (when kl_coef > 0). Both are constants
        of the loss."""
        # rollout correction compares old with rollout log-probs before the loss (its global
        # normaliser counts the tokens it keeps), so it needs old_logp even for one update
        need_old = self.cfg.optim.updates_per_rollout > 1 or self.loss_config.corrects_rollout
        if not records or not (need_old or self.reference is not None):
            return records
        old: list[Any] = [None] * len(records)
        ref: list[Any] = [None] * len(records)
        models = [(m, out) for m, out in ((self.policy if need_old else None, old), (self.reference, ref)) if m]
        with nvtx.range("logprobs"):
            for idx in self._plan(records):
                batch = self._pack(records, idx)
                for model, out in models:
                    for i, values in zip(idx, batch.split_responses(self._logps(model, batch))):
                        out[i] = values.float().cpu()
        old, ref = self.parallel.merge(old), self.parallel.merge(ref)          # each rank filled its share
        return [dataclasses.replace(r, old_logp=old[i], ref_logp=ref[i]) for i, r in enumerate(records)]

    def mini_batches(self, records: list[SequenceRecord], step: int) -> list[list[SequenceRecord]]:
        """Split the rollout batch into updates (sequences of one prompt stay together);
        optim.epochs passes, each in its own seeded order."""
        groups = self._regroup(records)
        size = self.cfg.optim.mini_batch_prompts
        out = []
        for epoch in range(self.cfg.optim.epochs):
            order = list(range(len(groups)))
            if epoch:
                random.Random(self._seed(step, 1000 + epoch)).shuffle(order)
            for start in range(0, len(order), size):
                out.append([r for g in order[start:start + size] for r in groups[g]])
        return [mb for mb in out if mb]

    @staticmethod
    def _regroup(records: list[SequenceRecord]) -> list[list[SequenceRecord]]:
        """Consecutive records with the same prompt: one group (sizes vary once some are masked)."""
        out: list[list[SequenceRecord]] = []
        for r in records:
            key = tuple(r.token_ids[: r.response_start])
            if out and tuple(out[-1][0].token_ids[: out[-1][0].response_start]) == key:
                out[-1].append(r)
            else:
                out.append([r])
        return out

    def _loss(self, batch, normalizer: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy's GRPO loss on one packed micro-batch (decoder, then the fused LM head)."""
        hidden, weight = self.parallel.forward(self.policy, batch)
        return grpo_loss_from_hidden(hidden, weight, batch, config=self.loss_config, normalizer=normalizer,
                                     kernel_backend=self.cfg.model.kernel_backend, entropy_metric=True)

    def _correction(self, records: list[SequenceRecord]) -> MiniBatchCorrection | None:
        """Rollout correction over the whole mini-batch (every rank holds all its records, their
        old_logp merged by `attach_logps`): what it keeps and its metrics, or None when it is off.
        The micro-batches apply the same per-sequence rules to the same values, so these counts
        are their global normalisers, and the metrics are the same on every rank."""
        if not self.loss_config.corrects_rollout or not records:
            return None
        lengths = torch.tensor([r.num_response_tokens for r in records])                     # [S]
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))                               # [S+1]
        cat = lambda name: torch.cat([torch.as_tensor(getattr(r, name), dtype=torch.float32) for r in records])
        adv = torch.repeat_interleave(torch.tensor([r.advantage for r in records], dtype=torch.float32), lengths)
        mask = torch.ones(int(cu[-1]), dtype=torch.float32)                                   # [N] responses only
        rules = self.loss_config.rollout_correction
        corr = rollout_correction(cat("old_logp"), cat("rollout_logp"), adv, mask, cu, rules)
        tokens, sequences = kept_counts(mask, corr.keep, cu)
        return MiniBatchCorrection(tokens, sequences, {k: v.item() for k, v in corr.metrics.items()})

    def _normalizer(self, records: list[SequenceRecord], correction: MiniBatchCorrection | None) -> float:
        """The loss's global denominator for this mini-batch: response tokens (token-mean) or
        sequences (the seq-mean aggregations); with rollout correction only those it keeps (at
        least 1: everything dropped gives loss 0, gradient 0)."""
        token_mean = self.loss_config.loss_agg == "token-mean"
        if correction is not None:
            return max(correction.tokens if token_mean else correction.sequences, 1.0)
        return float(sum(r.num_response_tokens for r in records)) if token_mean else float(len(records))

    def update(self, records: list[SequenceRecord], step: int) -> dict[str, float]:
        """One optimizer step on a mini-batch: micro-batches planned by token budget, each
        loss normalised by the whole mini-batch's denominator, gradients accumulated.

        A non-finite loss (checked before its backward) or gradient norm skips the AdamW step:
        weights and optimizer state stay as they were, `skipped_update` is 1, a warning names
        the step."""
        self.policy.train()
        correction = self._correction(records)
        self.optimizer.zero_grad(set_to_none=True)
        stats, skip = self._accumulate(records, self._normalizer(records, correction))
        stats = self.parallel.reduce_update(stats)                   # this rank's share → the mini-batch
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
        """Forward + backward of this process's micro-batches, gradients accumulated; returns the
        metric sums and why the update must be skipped (None: it may be applied).

        The host reads each loss (as the metrics do anyway) before its backward is issued, so a
        NaN never propagates into the gradients; later micro-batches are moot. Under
        `parallel.lockstep` (FSDP) every rank must issue the same collectives: the backward runs
        anyway, the NaN reaches the global gradient norm, and every rank skips the step together."""
        stats, skip = UpdateStats(sums=defaultdict(float)), None
        for idx in self._plan(records):
            with nvtx.range("pack"):
                batch = self._pack(records, idx)
            with nvtx.range("forward"):
                loss, m = self._loss(batch, normalizer)
            loss_value = loss.item()
            stats.loss += loss_value
            if not math.isfinite(loss_value):
                skip = f"non-finite loss ({loss_value})"
                if not self.parallel.lockstep:
                    break
            with nvtx.range("backward"):
                loss.backward()
            count = m["num_tokens"].item()
            stats.tokens += count
            values = {k: v.item() for k, v in m.items()   # correction metrics: the mini-batch's, in update
                      if k != "num_tokens" and not k.startswith(CORRECTION_PREFIX)}
            stats.extremes = merge_extremes(stats.extremes, {k: v for k, v in values.items() if is_extreme(k)})
            for key, value in values.items():
                if not is_extreme(key):
                    stats.sums[key] += value * count
        stats.sums = dict(stats.sums)
        return stats, skip

    def _optimizer_step(self, step: int, skip: str | None) -> tuple[float, str | None, float]:
        """Clip and apply the accumulated gradients unless `skip`; returns (gradient norm before
        clipping, NaN when not computed; why the update was skipped or None; the lr)."""
        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = float("nan")
        with nvtx.range("optimizer"):
            if skip is None or self.parallel.lockstep:               # the norm is a collective under FSDP
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
        """Raise TrainingDivergedError when the update left a weight NaN or ±inf (a finite but
        far too large lr does, from finite gradients): one fused reduction and host sync
        (`guards.all_finite`), agreed on by every rank under FSDP."""
        if self.parallel.any_rank(not all_finite(self.policy.parameters())):
            raise self._diverged(f"step {step}: the weights are not finite after the optimizer update "
                                 f"(optim.lr={lr:g})")

    @torch.no_grad()
    def _check_outputs(self) -> None:
        """Raise TrainingDivergedError when the policy's log-probs on one held-out prompt are not
        finite. Weights can be finite and still overflow the forward (optim.lr=1e20 leaves them
        near 1e20: RMSNorm's mean square is inf): such a state is not saved. One forward of one
        short sequence, at each checkpoint."""
        problems = next(iter(self.data.heldout.values()), None) or \
            self.data.train.sample(1, random.Random(self.cfg.run.seed + 3))      # its own rng
        ids = self.prompt_ids(problems[0])
        if len(ids) < 2:
            return
        batch = self._pack([SequenceRecord(token_ids=ids, response_start=1, advantage=0.0)], [0])
        if self.parallel.any_rank(not all_finite([self._logps(self.policy, batch)])):
            raise self._diverged(f"step {self.state.step}: the policy's log-probs are not finite (its weights "
                                 f"overflow the forward; optim.lr={self._lr(self.state.step):g})")

    def _diverged(self, what: str) -> TrainingDivergedError:
        latest = checkpoint.latest_checkpoint(self.run_dir)
        return TrainingDivergedError(f"{what}; stopped without saving this state; last good checkpoint: "
                                     f"{latest if latest is not None else 'none'}")

    def _track_skips(self, step: int, stats: list[dict[str, float]]) -> None:
        """Count consecutive steps in which no update was applied (a step with no update at all
        counts neither way); raise TrainingDivergedError at optim.max_consecutive_skips."""
        if not stats:
            return
        if not all(s["skipped_update"] for s in stats):
            self.state.consecutive_skips = 0
            return
        self.state.consecutive_skips += 1
        limit = self.cfg.optim.max_consecutive_skips
        if self.state.consecutive_skips >= limit:
            latest = checkpoint.latest_checkpoint(self.run_dir)
            raise TrainingDivergedError(
                f"step {step}: {limit} consecutive steps without a finite update (optim.max_consecutive_skips="
                f"{limit}); stopped without saving this state; last good checkpoint: "
                f"{latest if latest is not None else 'none'}")
        self.log.write(f"step {step}: warning: no update applied; {self.state.consecutive_skips} consecutive "
                       f"skipped step(s), the run stops at optim.max_consecutive_skips={limit}")

    @staticmethod
    def _reduce(stats: list[dict[str, float]]) -> dict[str, float]:
        """Mean over the step's updates (max for *_max, min for *_min, sum for skipped_update). An
        update skipped on its first micro-batch has no loss-term metrics: those average over the others."""
        if not stats:
            return {"updates": 0}
        out = {}
        for key in dict.fromkeys(k for s in stats for k in s):        # every key, in first-seen order
            values = [s[key] for s in stats if key in s]
            reduce = max if key.endswith("_max") else min if key.endswith("_min") else (lambda v: sum(v) / len(v))
            out[key] = reduce(values)
        out["skipped_update"] = sum(s["skipped_update"] for s in stats)
        out["updates"] = len(stats)
        return out

    def _throughput(self, metrics: dict, records: list[SequenceRecord], t_rollout: float, t_train: float) -> dict:
        """Throughput and overlap metrics. Colocated, the trainer waits for the whole rollout and
        the engine for the whole update; split, both waits come from the two sides' clocks and
        the generation rate from the rollout ranks' own time (`split.SplitTrainer.collect`)."""
        lengths = [r.length for r in records]
        epochs = self.cfg.optim.epochs
        generation_s = metrics.pop("perf/generation_s", t_rollout)
        out = {"batch/sequences": len(records), "perf/rollout_s": generation_s, "perf/train_s": t_train,
               "perf/rollout_tokens_per_s": metrics.pop("perf/rollout_tokens") / max(generation_s, 1e-9),
               "perf/train_tokens_per_s": epochs * sum(lengths) / max(t_train, 1e-9),
               "perf/trainer_idle_s": metrics.pop("perf/trainer_idle_s", t_rollout),
               "perf/engine_idle_s": metrics.pop("perf/engine_idle_s", t_train),
               "perf/policy_lag_mean": metrics.pop("perf/policy_lag_mean", 0.0),
               "perf/policy_lag_max": metrics.pop("perf/policy_lag_max", 0.0)}
        if self._peak and records:
            c = self.policy.config
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            embed = self.policy.get_input_embeddings().weight
            # weights touched per token: all but the input embedding (a lookup), plus the LM head
            params = sum(p.numel() for p in self.policy.parameters()) - embed.numel()
            if self.policy.config.tie_word_embeddings:
                params += embed.numel()
            # forward + backward (3 passes) per epoch, plus one no-grad forward each for old_logp / ref_logp
            passes = 3.0 * epochs + (self.cfg.optim.updates_per_rollout > 1) + (self.reference is not None)
            flops = train_flops(params, c.num_hidden_layers, c.num_attention_heads * head_dim, lengths, passes=passes)
            out["perf/mfu"] = flops / (t_train * self._peak)
        return out

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """pass@1 (mean reward over eval.n samples), accuracy (samples with reward >= the
        threshold) and pass@k per held-out source; eval/score is the mean pass@1 over sources."""
        e = self.cfg.eval
        sampling = SamplingConfig(n=e.n, temperature=e.temperature, top_p=e.top_p,
                                  max_tokens=self.cfg.eval_max_tokens, seed=self.cfg.run.seed + EVAL_SEED_OFFSET)
        out: dict[str, float] = {}
        with nvtx.range("eval"):
            for name, problems in self.data.heldout.items():
                outs = self.engine.generate([self.prompt_ids(p) for p in problems], sampling)
                rewards = torch.tensor([[score(p, c.text) for c in cs] for p, cs in zip(problems, outs)])   # [P, n]
                correct = (rewards >= e.correct_threshold).sum(1).tolist()
                out[f"eval/{name}/pass@1"] = rewards.mean().item()
                out[f"eval/{name}/accuracy"] = sum(correct) / rewards.numel()
                out[f"eval/{name}/pass@{e.k}"] = sum(pass_at_k(e.n, c, e.k) for c in correct) / len(correct)
                out[f"eval/{name}/response_len"] = sum(len(c.response_ids) for cs in outs for c in cs) / rewards.numel()
        pass1 = [v for k, v in out.items() if k.endswith("/pass@1")]
        acc = [v for k, v in out.items() if k.endswith("/accuracy")]
        out["eval/score"] = sum(pass1) / max(len(pass1), 1)
        out["eval/accuracy"] = sum(acc) / max(len(acc), 1)
        pop_reward_errors()
        return out

    def _track_validation(self, value: float) -> None:
        best = self.state.best_score
        if best is None or value > best + self.cfg.reference.min_improvement:
            self.state.best_score, self.state.evals_since_best = value, 0
        else:
            self.state.evals_since_best += 1

    # ------------------------------------------------------------------ reference reset

    def reset_reason(self, step: int, evaluated: bool) -> str | None:
        """Why the reference should be reset after `step`, or None. The watch file is consumed."""
        r = self.cfg.reference
        reasons = []
        watch = self.run_dir / r.watch_file
        if self.parallel.is_main and watch.exists():                  # one rank decides, see below
            watch.unlink(missing_ok=True)
            reasons.append("on_demand")
        if r.mode in ("every", "both") and step % r.every == 0:
            reasons.append("every")
        if r.mode in ("patience", "both") and evaluated and self.state.evals_since_best >= r.patience:
            reasons.append("patience")
        reason = "+".join(reasons) or None
        return self.parallel.broadcast(reason)                         # rank 0 saw the file

    def reset_reference(self, reason: str) -> None:
        """The ProRL reset: reference ← policy, and (ProRL v1) a fresh optimizer state."""
        if self.reference is not None:
            self.reference.load_state_dict(self.policy.state_dict())
        if self.cfg.reference.reset_optimizer:
            self.optimizer = self._make_optimizer()
        self.state.evals_since_best = 0
        self.state.resets.append({"step": self.state.step, "reason": reason})
        self.log.write(f"step {self.state.step}: reference reset ({reason}); "
                       f"optimizer state {'cleared' if self.cfg.reference.reset_optimizer else 'kept'}")

    # ------------------------------------------------------------------ checkpoint

    def save(self) -> Path:
        self.state.sampler = self.rng.getstate()
        with nvtx.range("checkpoint"):
            self._check_outputs()                                   # nothing that cannot sample is saved
            return self.parallel.save_checkpoint(
                self.run_dir, self.state.step, policy=self.policy, tokenizer=self.tokenizer,
                optimizer=self.optimizer, reference=self.reference, trainer_state=dataclasses.asdict(self.state),
                keep_last=self.cfg.run.keep_last, tokenizer_source=self.cfg.model.path)
