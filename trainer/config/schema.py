"""The schema of a training run: one `@dataclass(kw_only=True)` per config section and
`TrainConfig`, their root. Every field has a docstring; every section checks its own fields in
`__post_init__`, and `TrainConfig` adds the checks that span sections.

A field with a fixed set of values is a `Literal` defined here (`AttnBackend`, `EngineName`,
...): the modules that implement the choices import these types, so each list is written once
and the schema imports none of them. The loss options are the kernels' own `GRPOLossConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Literal, get_args

from prolix.kernels import GRPOLossConfig

from .sources import SourceConfig
from .tree import check_choice, check_field, check_literal_fields

__all__ = ["ModelConfig", "DemoConfig", "DataConfig", "RolloutConfig", "AlgorithmConfig", "OptimConfig",
           "ReferenceConfig", "EvalConfig", "RunConfig", "TrainConfig", "PRORL_LOSS", "Placement", "EngineName",
           "AttnBackend", "KernelBackend", "AdvantageMethod", "OverlongMode"]


# ----------------------------------------------------------------------------- sections

Placement = Literal["colocated", "split"]
"""Where generation runs: with training, in turn, or on rollout ranks of its own (`parallel.split`)."""
EngineName = Literal["torch", "vllm"]
"""The rollout engines (`rollout.engines.ENGINES`)."""
AttnBackend = Literal["auto", "flash_attn", "torch_varlen", "sdpa_block_mask", "sdpa_per_sequence"]
"""Packed attention backends (`model.ATTN_BACKENDS`)."""
KernelBackend = Literal["auto", "torch", "triton"]
"""`prolix.kernels` backends: Triton on CUDA tensors, streaming torch on CPU, or "auto"."""
AdvantageMethod = Literal["grpo", "dr_grpo"]
"""Group advantages (`rollout.advantages.group_advantages`)."""
OverlongMode = Literal["none", "penalty", "mask"]
"""Truncated responses (`rollout.advantages.shape_overlong`)."""


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """The policy (and, as a frozen copy, the reference)."""

    path: str = ""
    """Local Hugging Face model directory (config.json + *.safetensors + tokenizer); never
    downloaded. Empty: build the embedded demo model described by the `demo` section."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Parameter (master weight) dtype: "auto" (fp32), "fp32" or "bf16". AdamW at ProRL's
    lr 2e-6 needs fp32 master weights: a bf16 weight ignores updates below 2^-8 of itself."""
    autocast: Literal["auto", "bf16", "off"] = "auto"
    """Compute dtype: "auto" (bf16 on CUDA, off on CPU), "bf16" or "off". With bf16 the decoder
    runs under torch.autocast and the fused LM head gets bf16 hidden states and weight."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward (needed at 16k-token micro-batches)."""
    attn_backend: AttnBackend = "auto"
    """Packed attention backend, see `prolix.trainer.model.ATTN_BACKENDS`."""
    kernel_backend: KernelBackend = "auto"
    """`prolix.kernels` backend: "auto" (Triton on CUDA, streaming torch on CPU), "torch", "triton"."""

    def __post_init__(self) -> None:
        check_literal_fields(self, "model")


@dataclasses.dataclass(kw_only=True)
class DemoConfig:
    """The embedded default's model and warm start; used only when `model.path` is empty."""

    hidden_size: int = 128
    """Width of the tiny Qwen2 model (CPU-trainable in minutes)."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Query heads (head dim = hidden_size / num_heads)."""
    num_kv_heads: int = 2
    """Key/value heads (GQA, as in Qwen2)."""
    intermediate_size: int = 512
    """SwiGLU MLP width."""
    warmup_steps: int = 600
    """Supervised steps on the task's worked answers before RL: enough to learn the layout and
    much of the arithmetic."""
    warmup_batch: int = 32
    """Worked examples per supervised step."""
    warmup_lr: float = 1.5e-3
    """AdamW learning rate of the warm start (cosine to 10%); a larger one can leave the warm start
    on a plateau for some seeds."""
    tagged_fraction: float = 0.5
    """Share of warm-start answers that end in "<answer>X</answer>"; the rest end in "The answer
    is X.", which the scorer does not read (no tag, no reward). The model leaves the warm start
    with both habits and has to find out from the reward alone which one pays: the format lesson
    that RL teaches real base models (DeepSeek-R1-Zero's format reward), in miniature."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "warmup_batch"):
            check_field(getattr(self, name) >= 1, f"demo.{name}", f"expected >= 1, got {getattr(self, name)}")
        check_field(self.warmup_steps >= 0, "demo.warmup_steps", f"expected >= 0, got {self.warmup_steps}")
        check_field(self.hidden_size % self.num_heads == 0, "demo.hidden_size",
                    f"expected a multiple of demo.num_heads={self.num_heads}, got {self.hidden_size}")
        check_field(self.num_heads % self.num_kv_heads == 0, "demo.num_kv_heads",
                    f"expected a divisor of demo.num_heads={self.num_heads}, got {self.num_kv_heads}")
        check_field(self.warmup_lr > 0, "demo.warmup_lr", f"expected > 0, got {self.warmup_lr}")
        check_field(0 <= self.tagged_fraction <= 1, "demo.tagged_fraction",
                    f"expected in [0, 1], got {self.tagged_fraction}")


# The loss terms of the ProRL recipe where they differ from GRPOLossConfig's own defaults:
# DAPO's clip-higher (ProRL: 0.4) and a small KL to the reference (ProRL does not report its β).
PRORL_LOSS = {"clip_high": 0.4, "kl_coef": 1e-4}

# The demo's task, as YAML would write it: `load_config` starts from this tree, so reading a
# config that names its own sources never builds (or imports) the default one.
DEFAULT_SOURCES = [{"kind": "reasoning_gym", "name": "chain_sum", "reward": "reasoning_gym_binary", "heldout_size": 128,
                    "dataset_kwargs": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}}]


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(**copy.deepcopy(s)) for s in DEFAULT_SOURCES]


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Where prompts come from: one or more sources, mixed by weight."""

    sources: list[SourceConfig] = dataclasses.field(default_factory=_default_sources,
                                                    metadata={"tree_default": DEFAULT_SOURCES})
    """Prompt sources (`prolix.trainer.tasks.SourceConfig`): reasoning-gym datasets by name,
    or JSONL/parquet files with a prompt and an answer field. Each brings its own held-out set."""
    system_prompt: str = ""
    """System turn of every prompt; "" omits it (the demo: its tiny model reads every prompt
    token and learns the format from its warm start). Real models need the instruction the
    rewards parse: `tokenizer.SYSTEM_PROMPT` asks for reasoning, then `<answer>...</answer>`,
    which the reasoning-gym rewards extract (the examples set it)."""

    def __post_init__(self) -> None:
        check_field(len(self.sources) >= 1, "data.sources", "expected at least one source")
        for i, source in enumerate(self.sources):
            check_field(isinstance(source, SourceConfig), f"data.sources[{i}]",
                        f"expected a SourceConfig, got {type(source).__name__}")


@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    """Sampling of the training rollouts."""

    engine: str = "torch"
    """Rollout engine by name (`prolix.trainer.rollout.engines.ENGINES`): "vllm" or "torch" (a KV-cache
    sampler for machines without vLLM); checked at load, before any model is built."""
    n: int = 8
    """Samples per prompt (the GRPO group). ProRL: 16."""
    temperature: float = 1.0
    """Sampling temperature; the loss divides the logits by the same τ. ProRL: 1.2."""
    top_p: float = 1.0
    """Nucleus sampling. Keep 1.0 for training: the loss's log-probs are over the full softmax."""
    max_tokens: int = 48
    """Response budget (tokens); responses cut here are "truncated". ProRL: 8k, then 16k."""
    max_prompt_tokens: int = 128
    """Longest prompt accepted; longer prompts are an error naming the problem."""
    max_model_len: int = 176
    """Context the engine allocates (>= max_prompt_tokens + max_tokens, <= the model's context)."""
    engine_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword arguments of the engine (e.g. vLLM's gpu_memory_utilization)."""
    placement: Placement = "colocated"
    """"colocated": every process samples, then trains (the synchronous loop, `make train`).
    "split": the torchrun world is divided into trainer ranks (the first world − rollout_ranks;
    FSDP2 among them) and `rollout_ranks` ranks that each hold an engine and generate while
    the trainers train (`parallel.split`); launched by the same `prolix train --nproc G` / torchrun."""
    rollout_ranks: int = 1
    """Split placement: how many ranks (the last ones of the world) generate."""
    max_staleness: int = 1
    """Split placement: step s trains on completions sampled by the policy of at most this many
    updates before (exactly this many once the run is under way). 0 is synchronous training."""
    split_tis_cap: float | None = 2.0
    """Split placement: the truncated importance weight min(π_old/π_rollout, C) against the
    engine's log-probs, C = this, when algorithm.loss sets neither tis_cap nor
    rollout_correction (which then decide). null: no correction."""
    sync_bucket_mb: float = 256.0
    """Split placement: the weights go to the rollout ranks in flat buckets of this size (MiB)."""
    reward_workers: int = 0
    """Processes that score completions (math-verify and sandboxed code tests are CPU-bound);
    0 scores in the sampling process itself. Both placements (`rewards.RewardPool`)."""

    def __post_init__(self) -> None:
        check_choice(self.engine, "rollout.engine", get_args(EngineName))
        check_field(self.n >= 2, "rollout.n",
                    f"expected >= 2 (group advantages need 2 samples per prompt), got {self.n}")
        check_field(self.temperature > 0, "rollout.temperature", f"expected > 0, got {self.temperature}")
        check_field(0 < self.top_p <= 1, "rollout.top_p", f"expected in (0, 1], got {self.top_p}")
        for name in ("max_tokens", "max_prompt_tokens", "max_model_len", "rollout_ranks"):
            check_field(getattr(self, name) >= 1, f"rollout.{name}", f"expected >= 1, got {getattr(self, name)}")
        for name in ("max_staleness", "reward_workers"):
            check_field(getattr(self, name) >= 0, f"rollout.{name}", f"expected >= 0, got {getattr(self, name)}")
        check_field(self.split_tis_cap is None or self.split_tis_cap >= 1, "rollout.split_tis_cap",
                    f"expected null or >= 1 (a cap below 1 shrinks every on-policy token), got {self.split_tis_cap}")
        check_field(self.sync_bucket_mb > 0, "rollout.sync_bucket_mb", f"expected > 0, got {self.sync_bucket_mb}")


@dataclasses.dataclass(kw_only=True)
class AlgorithmConfig:
    """The objective: GRPO loss terms, advantages, dynamic sampling, length control."""

    loss: GRPOLossConfig = dataclasses.field(default_factory=lambda: GRPOLossConfig(**PRORL_LOSS),
                                             metadata={"tree_default": PRORL_LOSS})
    """The GRPO loss terms: the kernels' own `prolix.kernels.GRPOLossConfig` (clip_low, clip_high,
    dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap, loss_agg, max_len, ratio_level,
    rollout_correction; see its docstring), with the ProRL recipe's defaults (`PRORL_LOSS`). Two
    of its fields come from elsewhere at load: `temperature` is rollout.temperature (the loss
    divides the logits by the sampling τ, whatever a file says), and `max_len` of
    seq-mean-token-sum-norm defaults to rollout.max_tokens. kl_coef = 0 keeps no reference model
    at all. `rollout_correction` (the kernels' `RolloutCorrectionConfig`, off by default) is the
    training–inference mismatch against the engine's log-probs; with any rule on, old_logp is
    recomputed every step (one extra no-grad forward) and the dropped tokens leave the loss and
    its global normaliser, counted before the loss from old_logp, so its off-policy mask must be
    measured against it (off_policy_logp "old")."""
    advantage: AdvantageMethod = "grpo"
    """"grpo" (r − mean)/std over the group, or "dr_grpo" r − mean (Dr.GRPO)."""
    dynamic_sampling: bool = True
    """DAPO: drop groups whose rewards are all equal (no signal) and sample more prompts until
    the batch is full."""
    max_sampling_tries: int = 4
    """Rollout rounds per step at most when refilling; a batch still short trains on what it has."""
    overlong: OverlongMode = "none"
    """Responses truncated at max_tokens: "none", "penalty" (reward lowered, see
    `rollout.advantages.shape_overlong`) or "mask" (excluded from the loss, DAPO's overlong filtering)."""
    overlong_penalty: float = 1.0
    """Reward subtracted from truncated responses in "penalty" mode."""
    batch_invariant: bool = False
    """Bitwise on-policy (docs/bitwise.md): the policy's packed forward and LM head run
    batch-invariant operators (a token's log-prob has the same bits alone, packed at any offset,
    in any micro-batch or rank), and so does the torch sampler's decode, so its log-probs equal
    the trainer's old log-probs bit for bit; the trainer then uses them instead of recomputing
    (see verify_on_policy_every). With rollout.engine=vllm it turns on vLLM's own batch-invariant
    mode (VLLM_BATCH_INVARIANT=1): a measured mismatch, no bitwise promise. Needs
    model.attn_backend=auto, model.gradient_checkpointing=false and the colocated placement."""
    verify_on_policy_every: int = 10
    """With batch_invariant: every this many steps the trainer recomputes the old log-probs
    instead of taking the rollout's (1: every step) and logs rollout/logp_diff_max, the largest
    |rollout − trainer| log-prob difference (0.0 with the torch engine). The metric is also
    logged whenever the trainer computes old log-probs for other reasons (rollout correction,
    several updates per rollout)."""

    def __post_init__(self) -> None:
        check_literal_fields(self, "algorithm")
        check_field(isinstance(self.loss, GRPOLossConfig), "algorithm.loss",
                    f"expected a GRPOLossConfig, got {type(self.loss).__name__}")
        rc = self.loss.rollout_correction
        check_field(rc is None or rc.off_policy_logp == "old", "algorithm.loss.rollout_correction.off_policy_logp",
                    "expected 'old' (the trainer counts the kept tokens of its normaliser before the loss, from "
               f"old_logp), got {getattr(rc, 'off_policy_logp', None)!r}")
        check_field(self.max_sampling_tries >= 1, "algorithm.max_sampling_tries",
                    f"expected >= 1, got {self.max_sampling_tries}")
        check_field(self.overlong_penalty >= 0, "algorithm.overlong_penalty",
                    f"expected >= 0, got {self.overlong_penalty}")
        check_field(self.verify_on_policy_every >= 1, "algorithm.verify_on_policy_every",
                    f"expected >= 1, got {self.verify_on_policy_every}")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """Batch shape and the optimizer."""

    lr: float = 1e-4
    """AdamW learning rate (finite, > 0), constant after warmup. ProRL: 2e-6 (1.5B). The demo's 1e-4 is
    near the largest its tiny model tolerates (AdamW moves every weight by about lr per step)."""
    warmup_steps: int = 0
    """Linear warmup of the lr over this many RL steps (0: constant from the start)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2)."""
    eps: float = 1e-8
    """AdamW ε."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; the norm is still logged)."""
    prompts_per_step: int = 16
    """Prompts (groups) per rollout batch; the step trains on prompts_per_step · n sequences. ProRL: 256."""
    mini_batch_prompts: int = 16
    """Prompts per optimizer update; prompts_per_step / mini_batch_prompts updates per rollout
    (ProRL: 256 / 64 = 4)."""
    epochs: int = 1
    """Passes over the rollout batch (PPO epochs); updates per rollout multiply by it."""
    max_tokens_per_microbatch: int = 4096
    """Token budget of one packed forward/backward (micro-batches are planned first-fit decreasing)."""
    max_consecutive_skips: int = 3
    """An update whose loss or gradient norm is not finite is skipped (no AdamW step); a step
    none of whose updates was applied counts as skipped. After this many consecutive skipped
    steps the run stops with an error, without checkpointing, so `latest` stays the last good one."""

    def __post_init__(self) -> None:
        check_field(math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"expected a finite value > 0, got {self.lr}")
        for name in ("eps", "weight_decay", "grad_clip"):        # inf or nan would reach every weight
            check_field(math.isfinite(getattr(self, name)), f"optim.{name}", f"expected a finite value, got "
                   f"{getattr(self, name)}")
        check_field(self.warmup_steps >= 0, "optim.warmup_steps", f"expected >= 0, got {self.warmup_steps}")
        check_field(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                    f"expected two values in [0, 1), got {self.betas}")
        check_field(self.eps > 0, "optim.eps", f"expected > 0, got {self.eps}")
        check_field(self.weight_decay >= 0, "optim.weight_decay", f"expected >= 0, got {self.weight_decay}")
        check_field(self.grad_clip >= 0, "optim.grad_clip", f"expected >= 0, got {self.grad_clip}")
        for name in ("prompts_per_step", "mini_batch_prompts", "epochs", "max_tokens_per_microbatch"):
            check_field(getattr(self, name) >= 1, f"optim.{name}", f"expected >= 1, got {getattr(self, name)}")
        check_field(self.prompts_per_step % self.mini_batch_prompts == 0, "optim.mini_batch_prompts",
                    f"expected a divisor of optim.prompts_per_step={self.prompts_per_step}, "
                    f"got {self.mini_batch_prompts}")
        check_field(self.max_consecutive_skips >= 1, "optim.max_consecutive_skips",
                    f"expected >= 1, got {self.max_consecutive_skips}")

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps per rollout batch; > 1 makes the loop recompute old_logp."""
        return self.prompts_per_step // self.mini_batch_prompts * self.epochs


@dataclasses.dataclass(kw_only=True)
class ReferenceConfig:
    """The ProRL reference reset: reference ← policy (and, in v1, a fresh optimizer)."""

    mode: Literal["off", "patience", "every", "both"] = "patience"
    """When to reset: "off", "patience" (validation stopped improving — ProRL), "every"
    (a fixed period — ProRL v2) or "both". A file `watch_file` in the run dir always triggers one."""
    patience: int = 3
    """Scheduled evaluations (`eval.every`) without a new best validation score before a reset.
    The evaluation after the last step does not count, so a run stopped and resumed resets
    where an uninterrupted one does."""
    min_improvement: float = 0.0
    """A validation score must beat the best by more than this to count as an improvement."""
    every: int = 0
    """Reset every this many steps in "every"/"both" modes (ProRL v2: 200–500)."""
    reset_optimizer: bool = True
    """Re-initialise the AdamW state at each reset (ProRL v1: True; v2 keeps it: False)."""
    watch_file: str = "RESET_REFERENCE"
    """Create this file in the run dir to reset at the end of the current step; the loop deletes it."""

    def __post_init__(self) -> None:
        check_literal_fields(self, "reference")
        check_field(self.patience >= 1, "reference.patience", f"expected >= 1, got {self.patience}")
        check_field(self.every >= 0, "reference.every", f"expected >= 0, got {self.every}")
        check_field(self.mode not in ("every", "both") or self.every >= 1, "reference.every",
                    f"expected >= 1 with reference.mode={self.mode!r}, got {self.every}")
        check_field(bool(self.watch_file) and "/" not in self.watch_file, "reference.watch_file",
                    f"expected a plain file name, got {self.watch_file!r}")


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    """Validation on each source's held-out problems."""

    every: int = 20
    """Evaluate every this many steps (0: only before and after training)."""
    at_start: bool = True
    """Evaluate once before the first step (the "before" of the final report)."""
    heldout_size: int | None = None
    """Held-out problems per source at most; None: the source's whole held-out set."""
    n: int = 4
    """Samples per held-out problem; pass@1 averages over them."""
    k: int = 4
    """pass@k (unbiased estimator over the n samples); k <= n."""
    temperature: float = 0.6
    """Evaluation temperature (the ProRL paper's 0.6)."""
    top_p: float = 0.95
    """Evaluation nucleus (the paper's 0.95)."""
    max_tokens: int | None = None
    """Response budget for evaluation; None = rollout.max_tokens."""
    correct_threshold: float = 1.0
    """A sample counts as correct (accuracy, pass@k) when its reward is >= this."""

    def __post_init__(self) -> None:
        check_field(self.every >= 0, "eval.every", f"expected >= 0, got {self.every}")
        check_field(self.heldout_size is None or self.heldout_size >= 1, "eval.heldout_size",
                    f"expected >= 1 or null, got {self.heldout_size}")
        check_field(self.n >= 1, "eval.n", f"expected >= 1, got {self.n}")
        check_field(1 <= self.k <= self.n, "eval.k", f"expected 1 <= k <= eval.n={self.n}, got {self.k}")
        check_field(self.temperature > 0, "eval.temperature", f"expected > 0, got {self.temperature}")
        check_field(0 < self.top_p <= 1, "eval.top_p", f"expected in (0, 1], got {self.top_p}")
        check_field(self.max_tokens is None or self.max_tokens >= 1, "eval.max_tokens",
                    f"expected >= 1 or null, got {self.max_tokens}")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """Where the run lives, how long it goes, how it is checkpointed and logged."""

    out_dir: str = "runs"
    """Parent folder of run directories."""
    name: str = ""
    """Run directory name under out_dir; empty: a timestamp."""
    seed: int = 0
    """Seeds model init (demo), prompt sampling, and each step's rollout sampling."""
    steps: int = 80
    """RL steps (one rollout batch each)."""
    checkpoint_every: int = 40
    """Checkpoint every this many steps (and always after the last; 0: only the last)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after each new one is complete."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda" or "cuda:N"."""
    tensorboard: bool = True
    """Also write TensorBoard events when tensorboard is installed."""
    progress: bool = True
    """Show a tqdm progress bar."""
    plot: bool = True
    """Write RUN/curves.png (matplotlib, when installed) as the run ends."""
    wandb: bool = False
    """Also log every metrics.jsonl record, at the same step, to Weights & Biases (`pip install
    "prolix[wandb]"`; `wandb login`, or WANDB_MODE=offline and `wandb sync RUN/wandb` later).
    A resumed run continues the same W&B run (its id is kept in RUN/wandb.json). Not installed,
    not logged in or unreachable: one warning, and the run goes on without it (`sinks.py`)."""
    wandb_project: str = "prolix"
    """W&B project of the run."""
    wandb_entity: str = ""
    """W&B entity (user or team); empty: the logged-in account's default entity."""
    wandb_tags: list[str] = dataclasses.field(default_factory=list)
    """W&B tags of the run (1-64 characters each)."""

    def __post_init__(self) -> None:
        check_field(self.steps >= 0, "run.steps", f"expected >= 0, got {self.steps}")
        check_field(self.checkpoint_every >= 0, "run.checkpoint_every", f"expected >= 0, got {self.checkpoint_every}")
        check_field(self.keep_last >= 1, "run.keep_last", f"expected >= 1, got {self.keep_last}")
        check_field(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "run.device",
                    f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        check_field("/" not in self.name, "run.name", f"expected a plain directory name, got {self.name!r}")
        check_field(bool(self.wandb_project.strip()), "run.wandb_project", "expected a project name, got ''")
        for i, tag in enumerate(self.wandb_tags):      # W&B's own limits, checked before the run starts
            check_field(1 <= len(tag) <= 64, f"run.wandb_tags[{i}]", f"expected 1-64 characters, got {tag!r}")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """One training run. Defaults: the embedded demo (`prolix train` with no arguments)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        r = self.rollout
        loss = self.algorithm.loss
        check_field(loss.temperature == r.temperature, "algorithm.loss.temperature",          # a config built in code
                    f"expected rollout.temperature ({r.temperature}), the sampling τ the loss divides by, "
               f"got {loss.temperature}")
        check_field(r.max_prompt_tokens + r.max_tokens <= r.max_model_len, "rollout.max_tokens",
                    f"a prompt of up to rollout.max_prompt_tokens={r.max_prompt_tokens} plus a response of "
               f"{r.max_tokens} tokens exceeds rollout.max_model_len={r.max_model_len}")
        check_field(self.eval_max_tokens + r.max_prompt_tokens <= r.max_model_len, "eval.max_tokens",
                    f"{self.eval_max_tokens} + rollout.max_prompt_tokens={r.max_prompt_tokens} exceeds "
               f"rollout.max_model_len={r.max_model_len}")
        check_field(self.optim.max_tokens_per_microbatch >= r.max_prompt_tokens + r.max_tokens,
                    "optim.max_tokens_per_microbatch",
               f"expected >= the longest sequence, rollout.max_prompt_tokens + rollout.max_tokens = "
               f"{r.max_prompt_tokens + r.max_tokens}, got {self.optim.max_tokens_per_microbatch}")
        if self.algorithm.batch_invariant:
            self._check_batch_invariant()

    def _check_batch_invariant(self) -> None:
        """What algorithm.batch_invariant cannot make invariant: one line each, before any model."""
        check_field(self.model.attn_backend == "auto", "algorithm.batch_invariant",
                    f"needs model.attn_backend=auto (its own fixed-block attention); model.attn_backend="
               f"{self.model.attn_backend!r} runs a kernel whose result depends on the batch")
        check_field(not self.model.gradient_checkpointing, "algorithm.batch_invariant",
                    "needs model.gradient_checkpointing=false; the recomputation in the backward runs outside "
               "the batch-invariant operators, so the recomputed activations are not the saved ones")
        check_field(self.rollout.placement == "colocated", "algorithm.batch_invariant",
                    "needs rollout.placement=colocated; the split placement samples with weights up to "
               "rollout.max_staleness updates old, so its log-probs are not the trainer's old ones")

    @property
    def eval_max_tokens(self) -> int:
        return self.eval.max_tokens or self.rollout.max_tokens

    def loss_config(self) -> GRPOLossConfig:
        """The kernels' loss config of this run (`algorithm.loss`, completed at load); in the
        split placement with no rollout-vs-old rule of its own, tis_cap = rollout.split_tis_cap."""
        loss, r = self.algorithm.loss, self.rollout
        if r.placement == "split" and r.split_tis_cap is not None and loss.tis_cap is None \
                and not loss.corrects_rollout:
            return dataclasses.replace(loss, tis_cap=r.split_tis_cap)
        return loss

    def check_model_context(self, max_position_embeddings: int | None) -> None:
        """Raise ConfigError when the engine's context exceeds what the model was built for."""
        if max_position_embeddings is None:
            return
        r = self.rollout
        check_field(r.max_model_len <= max_position_embeddings, "rollout.max_model_len",
                    f"{r.max_model_len} exceeds the model's context (config.json max_position_embeddings="
               f"{max_position_embeddings}); lower rollout.max_tokens ({r.max_tokens}) or "
               f"rollout.max_prompt_tokens ({r.max_prompt_tokens})")
