"""The README's Python examples run as written (they are documentation users copy), the README
stays a five-minute read, and every relative link of the project's documents resolves to a file
(and heading) of the repository, which names no file outside it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
DOCUMENTS = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "examples" / "README.md", ROOT / "benchmarks" / "README.md",
             ROOT / "benchmarks" / "results" / "README.md"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"\b[Ii]ssue \d+|\bshared/|\bDESIGN\.md|/work/")


def test_readme_has_python_examples():
    assert BLOCKS


def test_readme_python_examples_run_in_order():
    namespace: dict = {}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md[python block {i}]", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - report which block broke
            pytest.fail(f"README python block {i} raised {type(e).__name__}: {e}\n{block}")


def test_readme_is_a_five_minute_read():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to -."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    titles = re.findall(r"^#+\s+(.*?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", t.lower().replace("`", "")).replace(" ", "-") for t in titles}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    assert document.is_file(), f"{document.relative_to(ROOT)} is missing"
    broken = []
    for target in LINK.findall(FENCE.sub("", document.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not the repository's
            continue
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.exists() or not resolved.is_relative_to(ROOT):
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)}: links that do not resolve: {broken}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_stand_alone(document):
    # No issue numbers and no files outside the repository: the documents are read without them.
    hits = OUTSIDE.findall(document.read_text(encoding="utf-8"))
    assert not hits, f"{document.relative_to(ROOT)} mentions {hits}"
