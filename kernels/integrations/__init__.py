"""prolix's fused loss inside other trainers: TRL and verl.

    prolix.kernels.integrations.trl    ProlixGRPOTrainer (a drop-in trl.GRPOTrainer) and
                                       patch_grpo_trainer(trainer)
    prolix.kernels.integrations.verl   a "prolix" policy loss in verl's registry and a "prolix"
                                       fused-kernel backend for its actor (packed log-probs)

Each module imports its host library only when a function needs it, so `prolix.kernels`
keeps depending on torch and triton alone; using one without its host library raises an
ImportError that says what to install.
"""

__all__ = ["trl", "verl"]
