"""Padding vs packing on a long-tailed RL mini-batch: useful tokens / computed tokens.

RL responses are long-tailed: most of a GRPO group finishes in a few thousand tokens, a few run
to the 16k limit. Padded batching computes every row to the longest sequence of its
micro-batch; packing (`prolix.trainer.packing`) computes exactly the real tokens. All batchings
get the same memory budget, `max_tokens` computed tokens per micro-batch:

    padded (arrival order)   consecutive sequences while rows × longest ≤ max_tokens
    padded (length-sorted)   the same after sorting by length (bucketing, the strong baseline)
    packed (FFD)             plan_microbatches(lengths, max_tokens), no padding

Per batching: micro-batches (forward/backward calls), computed tokens, token efficiency
(useful / computed tokens), compute efficiency (the same with the causal-attention term of
`sequence_cost`: a padded row costs cost(longest)), and fill (useful / (micro-batches ×
max_tokens), how much of each call's budget holds real tokens). Then the mini-batch is split
over `num_ranks` data-parallel ranks: round-robin vs `balance` (LPT, Karmarkar–Karp), reporting
the slowest rank's compute over the mean (1.0 = no rank waits).

    python -m prolix.benchmarks.packing_efficiency                     # the table
    python -m prolix.benchmarks.packing_efficiency --out DIR           # + JSON, markdown, PNG
    python -m prolix.benchmarks.packing_efficiency --quick             # 128 sequences

From Python: `measure_packing_efficiency(...) -> dict` (JSON-ready), `markdown(results)`,
`plot(results, path)`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from pathlib import Path

from prolix.trainer.packing import DEFAULT_ATTENTION_CROSSOVER, balance, plan_microbatches, sequence_cost

__all__ = ["sample_lengths", "measure_packing_efficiency", "markdown", "plot", "main"]

SCHEMA = "prolix-packing-efficiency/1"


def sample_lengths(num_sequences: int, *, max_response_tokens: int = 16384, group_size: int = 16,
                   seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, response) token counts of a GRPO mini-batch with long-tailed responses.

    Prompts ~ uniform[64, 1024], shared by the `group_size` responses of a group. Responses ~
    lognormal with median 0.15·max_response_tokens (2458 at 16k) and σ = 1, clipped to
    [16, max_response_tokens]: ≈ 3% hit the limit, as truncated rollouts do.
    """
    if num_sequences < 1 or group_size < 1 or max_response_tokens < 16:
        raise ValueError(f"need num_sequences >= 1, group_size >= 1, max_response_tokens >= 16; got "
                         f"{num_sequences}, {group_size}, {max_response_tokens}")
    rng = random.Random(seed)
    mu = math.log(0.15 * max_response_tokens)
    out = []
    for i in range(num_sequences):
        if i % group_size == 0:
            prompt = rng.randint(64, 1024)
        out.append((prompt, min(max_response_tokens, max(16, int(rng.lognormvariate(mu, 1.0))))))
    return out


def _padded_microbatches(lengths: list[int], order: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy consecutive micro-batches with rows × longest ≤ max_tokens (padding counted)."""
    batches, current, longest = [], [], 0
    for i in order:
        if current and (len(current) + 1) * max(longest, lengths[i]) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    return batches + ([current] if current else [])


def _batching_stats(name: str, lengths: list[int], batches: list[list[int]], *, padded: bool,
                    max_tokens: int, crossover: float) -> dict:
    useful = sum(lengths)
    useful_cost = sum(sequence_cost(x, crossover) for x in lengths)
    if padded:
        computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        computed_cost = sum(len(b) * sequence_cost(max(lengths[i] for i in b), crossover) for b in batches)
    else:
        computed, computed_cost = useful, useful_cost
    return {
        "batching": name,
        "micro_batches": len(batches),
        "useful_tokens": useful,
        "computed_tokens": computed,
        "token_efficiency": useful / computed,
        "compute_efficiency": useful_cost / computed_cost,
        "fill": useful / (len(batches) * max_tokens),
    }


def _balance_stats(name: str, lengths: list[int], parts: list[list[int]], *, max_tokens: int,
                   crossover: float) -> dict:
    loads = [sum(sequence_cost(lengths[i], crossover) for i in p) for p in parts]
    mean = sum(loads) / len(loads)
    return {
        "method": name,
        "max_over_mean": max(loads) / mean,
        "idle_fraction": 1 - mean / max(loads),
        "micro_batches_per_rank": [len(plan_microbatches([lengths[i] for i in p], max_tokens)) for p in parts],
    }


def measure_packing_efficiency(*, num_sequences: int = 1024, max_response_tokens: int = 16384,
                               max_tokens: int = 32768, num_ranks: int = 8, group_size: int = 16,
                               attention_crossover: float = DEFAULT_ATTENTION_CROSSOVER,
                               seed: int = 0) -> dict:
    """Compare padded batching with packing on one sampled mini-batch (pure Python, ~1 s).

    Args:
        num_sequences: sequences in the mini-batch (prompts × group_size).
        max_response_tokens: the response length limit (16384 in ProRL's later stages).
        max_tokens: computed-token budget of one micro-batch, the same for every batching;
            must be >= the longest sequence (prompt + response).
        num_ranks: data-parallel ranks for the balance comparison.
        group_size: responses per prompt (they share the prompt length).
        attention_crossover: L× of `sequence_cost` (the quadratic attention term).
        seed: the sampling seed; the result is a pure function of the arguments.

    Returns:
        A JSON-ready dict: "schema", "config" (the arguments), "lengths" (summary statistics),
        "batchings" (one row per batching: micro_batches, useful_tokens, computed_tokens,
        token_efficiency, compute_efficiency, fill — efficiencies in (0, 1]) and "balance"
        (one row per method: max_over_mean, idle_fraction, micro_batches_per_rank).
    """
    pairs = sample_lengths(num_sequences, max_response_tokens=max_response_tokens, group_size=group_size, seed=seed)
    lengths = [p + r for p, r in pairs]
    if max(lengths) > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} is below the longest sequence ({max(lengths)} tokens)")
    arrival = list(range(len(lengths)))
    random.Random(seed + 1).shuffle(arrival)        # rollouts finish in no particular order
    by_length = sorted(arrival, key=lambda i: -lengths[i])
    common = dict(max_tokens=max_tokens, crossover=attention_crossover)
    batchings = [
        _batching_stats("padded (arrival order)", lengths, _padded_microbatches(lengths, arrival, max_tokens),
                        padded=True, **common),
        _batching_stats("padded (length-sorted)", lengths, _padded_microbatches(lengths, by_length, max_tokens),
                        padded=True, **common),
        _batching_stats("packed (FFD)", lengths, plan_microbatches(lengths, max_tokens), padded=False, **common),
    ]
    round_robin = [list(range(r, len(lengths), num_ranks)) for r in range(num_ranks)]
    balances = [_balance_stats("round-robin", lengths, round_robin, **common)] + [
        _balance_stats(method, lengths, balance(lengths, num_ranks, method=method,
                                                attention_crossover=attention_crossover), **common)
        for method in ("lpt", "kk")
    ]
    responses = sorted(r for _, r in pairs)
    return {
        "schema": SCHEMA,
        "config": dict(num_sequences=num_sequences, max_response_tokens=max_response_tokens, max_tokens=max_tokens,
                       num_ranks=num_ranks, group_size=group_size, attention_crossover=attention_crossover,
                       seed=seed),
        "lengths": {
            "sequence_mean": statistics.fmean(lengths), "sequence_max": max(lengths),
            "response_median": statistics.median(responses),
            "response_p90": responses[int(0.9 * (len(responses) - 1))],
            "response_at_limit": sum(r == max_response_tokens for r in responses) / len(responses),
            "sequences": lengths,
        },
        "batchings": batchings,
        "balance": balances,
    }


def markdown(results: dict) -> str:
    """The results as two markdown tables (batchings, then rank balance) under a one-line header."""
    c, s = results["config"], results["lengths"]
    lines = [
        f"Packing efficiency: {c['num_sequences']} sequences (groups of {c['group_size']}), responses ≤ "
        f"{c['max_response_tokens']} (median {s['response_median']:.0f}, p90 {s['response_p90']}, "
        f"{100 * s['response_at_limit']:.1f}% at the limit), budget {c['max_tokens']} tokens per micro-batch, "
        f"seed {c['seed']}.",
        "",
        "| batching | micro-batches | computed tokens | token efficiency | compute efficiency | fill |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in results["batchings"]:
        lines.append(f"| {b['batching']} | {b['micro_batches']} | {b['computed_tokens']:,} | "
                     f"{b['token_efficiency']:.3f} | {b['compute_efficiency']:.3f} | {b['fill']:.3f} |")
    lines += ["", f"Split over {c['num_ranks']} ranks (compute = tokens + attention, L× = "
                  f"{c['attention_crossover']:.0f}):", "",
              "| method | slowest / mean rank | idle fraction | micro-batches per rank |", "|---|---:|---:|---|"]
    for b in results["balance"]:
        per_rank = b["micro_batches_per_rank"]
        lines.append(f"| {b['method']} | {b['max_over_mean']:.5f} | {b['idle_fraction']:.5f} | "
                     f"{min(per_rank)}–{max(per_rank)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path) -> Path:
    """Left: the sequence-length histogram; right: efficiencies and budget fill per batching."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_len, ax_eff) = plt.subplots(1, 2, figsize=(11, 4))
    ax_len.hist(results["lengths"]["sequences"], bins=50, color="tab:gray")
    ax_len.set_yscale("log")
    ax_len.set_xlabel("sequence length (prompt + response tokens)")
    ax_len.set_ylabel("sequences")
    ax_len.set_title("long-tailed mini-batch")
    names = [b["batching"] for b in results["batchings"]]
    x = range(len(names))
    bars = (("token_efficiency", "tokens"), ("compute_efficiency", "tokens + attention"),
            ("fill", "fill of the token budget"))
    for k, (key, label) in enumerate(bars):
        ax_eff.bar([i + 0.27 * (k - 1) for i in x], [b[key] for b in results["batchings"]], 0.27, label=label)
    ax_eff.set_xticks(list(x), names, fontsize=8)
    ax_eff.set_ylim(0, 1.3)
    ax_eff.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax_eff.set_ylabel("useful / computed")
    ax_eff.legend(loc="upper left", fontsize=8, ncols=3)
    ax_eff.set_title(f"budget {results['config']['max_tokens']} tokens per micro-batch")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: print the markdown tables; with --out DIR also write packing_efficiency.{json,md,png}."""
    parser = argparse.ArgumentParser(prog="python -m prolix.benchmarks.packing_efficiency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-sequences", type=int, default=1024)
    parser.add_argument("--max-response-tokens", type=int, default=16384)
    parser.add_argument("--max-tokens", type=int, default=32768, help="token budget per micro-batch")
    parser.add_argument("--num-ranks", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="128 sequences (CI smoke)")
    parser.add_argument("--out", type=Path, default=None, help="directory for JSON, markdown and PNG")
    args = parser.parse_args(argv)
    results = measure_packing_efficiency(
        num_sequences=128 if args.quick else args.num_sequences, max_response_tokens=args.max_response_tokens,
        max_tokens=args.max_tokens, num_ranks=args.num_ranks, group_size=args.group_size, seed=args.seed)
    table = markdown(results)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "packing_efficiency.json").write_text(json.dumps(results, indent=1))
        (args.out / "packing_efficiency.md").write_text(table)
        plot(results, args.out / "packing_efficiency.png")
        print(f"wrote {args.out}/packing_efficiency.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
