"""prolix's top-level `kernels/` folder never shadows Hugging Face's `kernels` package.

`python -m`, `torchrun -m` and `python -m pytest` put the current directory first on sys.path;
from the repository root, `import kernels` then finds prolix's source folder. Newer transformers
import Hugging Face's `kernels` when they load (`from kernels import CUDAProperties, ...`), and
the `kernels` package registers a setuptools `egg_info.writers` entry point that setup.py then
imports. These tests install a package named `kernels` into a temporary folder on PYTHONPATH
(nothing else lives there), make `import transformers` import it the way those transformers
releases do (a `sitecustomize` beside it), and run the documented commands from the repository
root: every one imports the installed package, never the folder.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from trainer_testing import SMALL_DEMO, TESTS, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

FAKE_KERNELS = {
    "kernels/__init__.py": "class CUDAProperties:\n    pass\n",
    "kernels/_internals/__init__.py": "",
    "kernels/_internals/locking.py": "def write_egg_lockfile(cmd, basename, filename):\n    pass\n",
    "kernels-0.19.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n",
    "kernels-0.19.1.dist-info/entry_points.txt":
        "[egg_info.writers]\nkernels.lock = kernels._internals.locking:write_egg_lockfile\n",
    # transformers' integrations/hub_kernels.py does this import as transformers loads
    "sitecustomize.py": textwrap.dedent("""
        import importlib.machinery
        import sys


        class ImportKernelsAfterTransformers:
            def find_spec(self, name, path=None, target=None):
                if name != "transformers":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                exec_module = spec.loader.exec_module

                def exec_then_import_kernels(module):
                    exec_module(module)
                    from kernels import CUDAProperties  # noqa: F401

                spec.loader.exec_module = exec_then_import_kernels
                return spec


        sys.meta_path.insert(0, ImportKernelsAfterTransformers())
    """),
}


@pytest.fixture(scope="module")
def env_with_kernels(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine where Hugging Face's `kernels` is installed."""
    site = tmp_path_factory.mktemp("site")
    for name, text in FAKE_KERNELS.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    return env


def run(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def test_the_simulated_transformers_really_imports_the_installed_kernels(env_with_kernels):
    proc = run([sys.executable, "-c", "import transformers, kernels; print(kernels.__file__)"], env_with_kernels)
    assert proc.stdout.strip() == str(Path(env_with_kernels["PYTHONPATH"]) / "kernels" / "__init__.py")


def test_import_kernels_from_the_repository_root_gets_the_installed_package(env_with_kernels):
    code = "import kernels, kernels._internals.locking, prolix.kernels; print(kernels.__file__, prolix.kernels.__file__)"
    got, ours = run([sys.executable, "-c", f"import sys; sys.path.insert(0, ''); {code}"], env_with_kernels).stdout.split()
    assert got == str(Path(env_with_kernels["PYTHONPATH"]) / "kernels" / "__init__.py")
    assert ours == str(REPO / "kernels" / "__init__.py")


def test_without_the_package_the_folder_looks_uninstalled_to_an_availability_check():
    # transformers imports a package it finds without metadata, and counts one without __file__ as absent
    code = ("import importlib, sys; sys.path.insert(0, ''); k = importlib.import_module('kernels'); "
            "print(k.__file__, k.__path__); k.get_kernel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout.strip() == "None []"
    assert proc.stderr.strip().splitlines()[-1] == (
        "AttributeError: module 'kernels' has no attribute 'get_kernel': Hugging Face's `kernels` package is not "
        f"installed ({REPO}/kernels is prolix's source, imported as prolix.kernels)")


def test_python_m_prolix_train_runs_the_demo_from_the_repository_root(env_with_kernels, tmp_path):
    proc = run([sys.executable, "-m", "prolix.trainer.cli", "train", *SMALL_DEMO, "run.steps=1",
                f"run.out_dir={tmp_path}"], env_with_kernels)
    assert proc.stdout.strip().splitlines()[-1].startswith("held-out accuracy: ")


def test_python_m_pytest_runs_a_test_module_from_the_repository_root(env_with_kernels):
    # the module imports transformers; one of its tests is enough to run
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_tokenizer.py",
                "-k", "save_and_autotokenizer_load_round_trip"], env_with_kernels)
    assert " passed" in proc.stdout.strip().splitlines()[-1], proc.stdout[-2000:]


def test_prolix_train_nproc_2_runs_its_torchrun_world_from_the_repository_root(
        env_with_kernels, base_model, problems, tmp_path):
    overrides = tiny_overrides(base_model, problems, tmp_path, **{"run.steps": 1, "eval.every": 0,
                                                                   "eval.at_start": "false"})
    env = {**env_with_kernels, "PYTHONPATH": os.pathsep.join([env_with_kernels["PYTHONPATH"], str(TESTS)])}
    run([str(BIN / "prolix"), "train", "--nproc", "2", *overrides], env)      # TESTS: the reward function
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_pip_install_no_build_isolation_editable_prepares_its_metadata_with_kernels_installed(env_with_kernels):
    # --dry-run prepares the editable metadata (egg_info, where the entry point is imported) and installs nothing
    proc = run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation",
                "--no-index", "-e", "."], {**env_with_kernels, "PROLIX_NO_NATIVE": "1"})
    assert "Would install prolix" in proc.stdout
