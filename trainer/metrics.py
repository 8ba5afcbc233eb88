"""Run logging: one JSONL line per step, the optional sinks (TensorBoard, W&B), a progress bar, a plot.

    log = MetricsLogger(run_dir, total_steps=cfg.run.steps, config=cfg)
    log.log(step, {"reward/mean": 0.4, ...})        # → RUN/metrics.jsonl (+ TensorBoard, W&B: sinks.py)
    log.close()                                      # → RUN/curves.png

JSONL keys (means over the step's response tokens unless said otherwise):
    step, time                      completed steps, seconds since the run (or resume) started
    reward/mean, reward/std         raw task reward of every sampled response (all refill rounds)
    pass_rate                       fraction of sampled responses counted correct
    response_len/mean, /max         response tokens; truncated_frac: cut at rollout.max_tokens
    batch/groups, /informative_frac, /tries, /sequences   dynamic sampling's view of the batch
    loss, pg_loss, kl, entropy, clip_frac, clip_frac_low, clip_frac_high, ratio_mean, ratio_max
    grad_norm (before clipping; null when an update of the step was skipped), lr
    rollout/logp_diff_max           max |rollout − trainer| log-prob over the step's response
                                    tokens, on steps where the trainer computed old log-probs
                                    (0.0 with algorithm.batch_invariant and the torch sampler)
    updates, skipped_update         optimizer updates of the step, and how many of them were
                                    skipped on a non-finite loss or gradient norm (`loop.Trainer.update`)
    consecutive_skips               steps in a row without an applied update (the run stops at
                                    optim.max_consecutive_skips)
    perf/rollout_tokens_per_s       generated tokens per second of rollout
    perf/train_tokens_per_s         packed tokens (prompt + response) per second of the update
    perf/step_s, /rollout_s, /train_s   wall seconds of the step, of generation, of the update
    perf/trainer_idle_s, /engine_idle_s   seconds the trainer waited for the batch and the engine
                                    for weights (colocated: the whole rollout, the whole update)
    perf/policy_lag_mean, /max      updates between the sampling and the trained policy (split
                                    placement; 0 colocated); sync/probe_logp_max_diff: `parallel.split`
    perf/mfu                        CUDA only: model FLOPs / (time · peak), formula in `train_flops`
    reference/resets                resets so far; reference/reset_reason on the step of a reset
    eval/<task>/pass@1, eval/<task>/pass@k, eval/<task>/accuracy, eval/score   on eval steps
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .sinks import MetricSink, SinkContext, SinkSettings, describe_error, open_sinks

__all__ = ["MetricsLogger", "MetricsFileError", "JsonlSink", "SilentLogger", "is_extreme", "merge_extremes", "pass_at_k",
           "policy_flops", "step_throughput", "reduce_updates",
           "train_flops", "peak_flops", "plot_curves", "read_metrics", "read_metrics_tolerant", "records_to_resume"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; MFU is not reported elsewhere.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def is_extreme(key: str) -> bool:
    """A metric reduced by max (*_max) or min (*_min) rather than averaged."""
    return key.endswith(("_max", "_min"))


def merge_extremes(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Two dicts of *_max / *_min metrics as one: max of the *_max keys, min of the *_min keys;
    a key in one only is kept as it is."""
    out = dict(a)
    for key, value in b.items():
        out[key] = value if key not in out else (max if key.endswith("_max") else min)(out[key], value)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 − C(n−c, k)/C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def train_flops(num_params: int, num_layers: int, attn_width: int, seq_lengths: list[int], *,
                passes: float = 3.0) -> float:
    """Model FLOPs of running `passes` forward-equivalents over packed sequences.

    Per token a forward costs 2·P (every weight once, multiply + add) and the backward twice
    that, so forward + backward = 6·P per token (passes = 3). Causal attention adds, per layer
    and sequence of length L, QKᵀ and PV over L²/2 pairs of width d = heads·head_dim:
    2·2·d·L²/2 = 2·d·L² forward. Total = passes·(2·P·ΣL + 2·n_layers·d·ΣL²). A no-grad
    forward (old_logp, ref_logp) is passes = 1. Activation recomputation is not counted (MFU,
    not hardware utilisation).
    """
    tokens = sum(seq_lengths)
    squares = sum(L * L for L in seq_lengths)
    return passes * (2.0 * num_params * tokens + 2.0 * num_layers * attn_width * squares)


def policy_flops(policy: torch.nn.Module, seq_lengths: list[int], *, passes: float) -> float:
    """`train_flops` of a Hugging Face causal LM: the weights touched per token are all but the
    input embedding (a lookup), plus the LM head (the embedding again when they are tied)."""
    c = policy.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    embed = policy.get_input_embeddings().weight
    params = sum(p.numel() for p in policy.parameters()) - embed.numel()
    if c.tie_word_embeddings:
        params += embed.numel()
    return train_flops(params, c.num_hidden_layers, c.num_attention_heads * head_dim, seq_lengths, passes=passes)


def step_throughput(metrics: dict[str, Any], seq_lengths: list[int], t_rollout: float, t_train: float,
                    epochs: int) -> dict[str, float]:
    """A step's throughput and overlap metrics; the perf/* entries a batch source reported
    (the split placement's waits, lag and generation time) are taken out of `metrics`.
    Colocated, the trainer waits for the whole rollout and the engine for the whole update."""
    generation_s = metrics.pop("perf/generation_s", t_rollout)
    return {"batch/sequences": len(seq_lengths), "perf/rollout_s": generation_s, "perf/train_s": t_train,
            "perf/rollout_tokens_per_s": metrics.pop("perf/rollout_tokens") / max(generation_s, 1e-9),
            "perf/train_tokens_per_s": epochs * sum(seq_lengths) / max(t_train, 1e-9),
            "perf/trainer_idle_s": metrics.pop("perf/trainer_idle_s", t_rollout),
            "perf/engine_idle_s": metrics.pop("perf/engine_idle_s", t_train),
            "perf/policy_lag_mean": metrics.pop("perf/policy_lag_mean", 0.0),
            "perf/policy_lag_max": metrics.pop("perf/policy_lag_max", 0.0)}


def reduce_updates(stats: list[dict[str, float]]) -> dict[str, float]:
    """A step's metrics from its updates': the mean (max for *_max, min for *_min, the sum for
    skipped_update). An update skipped on its first micro-batch has no loss-term metrics:
    those average over the others."""
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


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of a known CUDA GPU, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16.items() if key in name), None)


def _clean(value: Any) -> Any:
    """JSON-safe scalars: tensors → float, NaN/inf → None (JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class MetricsFileError(ValueError):
    """RUN/metrics.jsonl holds an unreadable line that is not its last; names the file and line."""


def read_metrics_tolerant(path: str | Path, *, warn=_warn) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl that a kill may have cut short: a final line that is not
    a whole JSON object (the kill came while it was being written) is dropped with a warning
    through `warn`; an unreadable line before the last raises MetricsFileError naming it."""
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:
            if number < len(lines):
                raise MetricsFileError(f"{path}: line {number} is not a JSON object ({e}): {line[:80]!r}") from None
            warn(f"prolix: warning: {path}: dropped its last line, cut short by a killed run: {line[:80]!r}")
            continue
        records.append(record)
    return records


def records_to_resume(path: str | Path, start_step: int, *, warn=_warn) -> list[dict[str, Any]]:
    """The lines of `path` that a run starting after step `start_step` keeps: those of steps
    <= start_step when it resumes a checkpoint, none when it starts afresh (start_step 0: a
    run name re-used after a run killed before its first checkpoint, whose step-0 evaluation
    the new run logs again). Each step appears once: a repeated step keeps its last line."""
    if start_step == 0:
        return []
    by_step = {r.get("step", 0): r for r in read_metrics_tolerant(path, warn=warn)}
    return [r for step, r in sorted(by_step.items()) if step <= start_step]


class JsonlSink:
    """RUN/metrics.jsonl, one line per record: the run's own record (the plot and resume read
    it), so unlike the optional sinks (sinks.py) a failure to write it stops the run."""

    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(self.path, "a")

    def log(self, step: int, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsLogger:
    """Sends each step record to RUN/metrics.jsonl and the optional sinks (TensorBoard, W&B:
    sinks.py), drives tqdm. `config` (the resolved TrainConfig) switches W&B on (`run.wandb`)
    and is what W&B records; a sink that fails is dropped with one warning line."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, plot: bool = True,
                 config: SinkSettings | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._plot = plot
        self.path = self.run_dir / METRICS_FILE
        if self.path.is_file():
            # Resuming: drop the lines a killed run wrote after its last checkpoint, so the
            # file reads as one uninterrupted run.
            kept = records_to_resume(self.path, start_step, warn=_warn)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = JsonlSink(self.path)
        self._bar = None
        # Opened before the bar exists: what a sink prints when it starts (W&B's banner) then
        # comes before the bar instead of through it.
        self._sinks: list[MetricSink] = open_sinks(SinkContext(self.run_dir, config, start_step, tensorboard,
                                                               warn=self.write))
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="prolix train", unit="step",
                             dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        self._jsonl.log(step, record)
        for sink in list(self._sinks):
            try:
                sink.log(step, record)
            except Exception as e:    # an optional sink's failure (a network error, ...) never stops the run
                # Dropped, not closed: closing a sink that just failed can fail (or block) again.
                self._sinks.remove(sink)
                self.write(f"step {step}: warning: metrics sink {sink.name!r} failed ({describe_error(e)}); "
                           "the run goes on without it")
        if self._bar is not None and "reward/mean" in record:
            shown = {"reward": record.get("reward/mean"), "len": record.get("response_len/mean")}
            if record.get("eval/score") is not None:
                shown["eval"] = record["eval/score"]
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=False)
            self._bar.update(step - self._bar.n)
        return record

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self, *, plot: bool = True) -> Path | None:
        self._jsonl.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None            # what the sinks print when they finish follows the bar
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as e:    # the run's own files are complete; say so and finish
                self.write(f"warning: metrics sink {sink.name!r} did not close cleanly ({describe_error(e)})")
        self._sinks = []
        return plot_curves(self.run_dir) if plot and self._plot else None



class SilentLogger:
    """`MetricsLogger`'s interface for the ranks other than 0 of a data-parallel run: writes and
    prints nothing (rank 0's logger has the whole world's metrics)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, **values}

    def write(self, message: str) -> None:
        pass

    def close(self, *, plot: bool = True) -> None:
        return None

def plot_curves(run_dir: str | Path) -> Path | None:
    """RUN/curves.png: reward, response length and held-out score against the step, resets
    marked; below, seconds per step (the step, both sides' idle time), tokens/s (generation,
    training) and the policy lag. None when there is nothing to plot or matplotlib is not
    installed."""
    records = read_metrics(run_dir)
    try:
        import matplotlib
    except ImportError:                  # optional: the JSONL holds everything the plot shows
        return None
    if not records:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("training reward", [("reward/mean", "reward mean"), ("pass_rate", "pass rate")]),
              ("response length (tokens)", [("response_len/mean", "mean"), ("response_len/max", "max")]),
              ("held-out", [k for k in _eval_keys(records)]),
              ("seconds per step", [("perf/step_s", "step"), ("perf/trainer_idle_s", "trainer idle"),
                                    ("perf/engine_idle_s", "engine idle")]),
              ("tokens/s", [("perf/rollout_tokens_per_s", "generation"), ("perf/train_tokens_per_s", "training")]),
              ("policy lag (updates)", [("perf/policy_lag_mean", "mean"), ("perf/policy_lag_max", "max")])]
    axes = axes.flatten()
    resets = [r["step"] for r in records if r.get("reference/reset_reason")]
    for ax, (title, keys) in zip(axes, panels):
        for key, label in keys:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, marker="o" if title == "held-out" else None, markersize=3, label=label)
        for x in resets:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title + (" (dotted: reference resets)" if resets and title == "training reward" else ""))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(run_dir) / PLOT_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _eval_keys(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and (k.endswith("/pass@1")
                   or k.endswith("/accuracy") or "/pass@" in k)})
    return [(k, k.removeprefix("eval/")) for k in keys]
