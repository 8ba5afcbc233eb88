"""Generating and scoring a step's batch: prompts → n completions each → rewards → advantages.

    engines      the rollout engines (the torch sampler, vLLM) behind one protocol
    rollouts     `Rollouts`: sample prompts, generate, score with the reward pool, group
    advantages   group advantages, overlong shaping, the informative-group filter
"""

from .rollouts import Group, Rollouts, rollout_seed

__all__ = ["Group", "Rollouts", "rollout_seed"]
