"""The typed configuration of one training run: the schema (a dataclass tree) and its loader.

    cfg = load_config("examples/prorl_1p5b_stage1_8k.yaml", ["optim.lr=1e-6", "rollout.n=8"])
    save_config(cfg, run_dir / "config.yaml")          # the resolved config, saved with the run

Every section is a `@dataclass(kw_only=True)` with a docstring under each field and its own
checks in `__post_init__`; `TrainConfig.__post_init__` adds the checks that span sections (a
prompt plus a response must fit the model's context and a micro-batch). Errors are
`ConfigError`s that name the field (`rollout.max_tokens: ...`), raised before anything heavy
is built. Unknown keys, in YAML or on the command line, are errors that list the valid keys.

A field with a fixed set of values is typed with a `Literal` defined in `schema` (`AttnBackend`,
`AdvantageMethod`, ...), which the modules that implement the choices import, so each list is
written once; the loss options are checked by the kernels' `GRPOLossConfig`. All of it happens
at load, before any model is built.

The defaults are the embedded demo (`make train`): a tiny model built and warm-started on CPU
(see `demo.py`), then the ProRL recipe scaled down. `examples/` holds the real 1.5B configs.

    schema   the sections, `TrainConfig` and the choice types; it imports no other part of
             the trainer but the source options, which check the reward they name
    sources  one prompt source's options (`SourceConfig`)
    tree     the schema-free YAML / override machinery and the field checks
    load     load_config / save_config, and reading older keys
"""

from .load import RENAMED_KEYS, apply_overrides, default_tree, load_config, save_config
from .schema import (
    PRORL_LOSS,
    AdvantageMethod,
    AlgorithmConfig,
    AttnBackend,
    DataConfig,
    DemoConfig,
    EngineName,
    EvalConfig,
    KernelBackend,
    ModelConfig,
    OptimConfig,
    OverlongMode,
    Placement,
    ReferenceConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
)
from .sources import SourceConfig
from .tree import ConfigError, config_from_dict, config_to_dict

__all__ = ["ConfigError", "ModelConfig", "DemoConfig", "DataConfig", "RolloutConfig", "AlgorithmConfig",
           "OptimConfig", "ReferenceConfig", "EvalConfig", "RunConfig", "TrainConfig", "SourceConfig", "load_config",
           "save_config", "config_to_dict", "config_from_dict", "apply_overrides", "default_tree", "Placement",
           "EngineName", "AttnBackend", "KernelBackend", "AdvantageMethod", "OverlongMode", "PRORL_LOSS",
           "RENAMED_KEYS"]
