"""The README's Python examples run as written (they are documentation users copy)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_examples():
    assert BLOCKS


def test_readme_python_examples_run_in_order():
    namespace: dict = {}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - report which block broke
            pytest.fail(f"README python block {i} raised {type(e).__name__}: {e}\n{block}")
