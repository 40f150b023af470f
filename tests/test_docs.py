"""The documentation runs and its links resolve.

Every ```python block of every page under docs/ runs, in order, in one namespace per page (a page
reads as one script). A block meant as a fragment is marked ```python no-run and left out; keep
those rare. docs/bring-your-own-model.md's examples run in tests/test_byom.py (with asserts on
what they make), not twice. Every relative link in README.md, BENCHMARKS.md and docs/ names a file
that exists (and a heading of it, for a #fragment), and every repository path they mention
(benchmarks/..., examples/..., raw results) exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
# Pages whose blocks another test runs, with that test.
RUN_ELSEWHERE = {
    "bring-your-own-model.md": "tests/test_byom.py::test_readme_worked_examples_run",
}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path, *, fragments: bool = False) -> list[str]:
    """A markdown file's ```python blocks, in order: the runnable ones, or the fragments."""
    blocks = []
    for info, code in FENCE.findall(path.read_text()):
        words = info.split()
        if words[:1] == ["python"] and (("no-run" in words[1:]) == fragments):
            blocks.append(code)
    return blocks


@pytest.mark.parametrize("page", [p for p in PAGES if p not in RUN_ELSEWHERE])
def test_page_runs(page):
    blocks = python_blocks(DOCS / page)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), namespace)


# Pages whose blocks need several devices or hosts: their forms run in an example that the
# tests execute on 8 simulated devices (examples/sharded.py, in tests/sharding_checks.py).
MULTI_DEVICE = {"sharding.md": ROOT / "examples" / "sharded.py"}


def test_multi_device_pages_have_their_example():
    for page, example in MULTI_DEVICE.items():
        assert (DOCS / page).exists() and example.exists(), (page, example)
        assert not python_blocks(DOCS / page), f"{page}: mark its blocks ```python no-run"


def test_every_page_is_run_and_fragments_are_rare():
    assert PAGES and set(RUN_ELSEWHERE) <= set(PAGES)
    fragments = {p: len(python_blocks(DOCS / p, fragments=True)) for p in PAGES
                 if p not in MULTI_DEVICE}
    fragments["README.md"] = len(python_blocks(ROOT / "README.md", fragments=True))
    assert sum(fragments.values()) <= 3, fragments


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


MARKDOWN = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _headings(file):
            missing.append(target)
    # Repository paths named in the text (commands, raw results): relative to the root.
    for path in re.findall(r"(?<![\w./-])((?:benchmarks|examples|docs|tests)/[\w./-]*[\w/])",
                           text):
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{doc.name}: {missing}"


def test_bench_options_listed():
    """BENCHMARKS.md's list of the bench's options is the parser's, choices included."""
    from jaxcache.evaluation import bench

    text = (ROOT / "BENCHMARKS.md").read_text()
    listing = re.search(r"`python -m jaxcache\.evaluation\.bench --help` lists the options:(.*?)"
                        r"\n\n", text, re.S).group(1)
    listed = dict(re.findall(r"`(--[\w-]+)(?: \{([^}]*)\})?", " ".join(listing.split())))
    actions = {option: action for action in bench._parser()._actions
               for option in action.option_strings if option.startswith("--")}
    actions.pop("--help")
    assert set(listed) == set(actions)
    for option, choices in listed.items():
        if choices:
            assert choices.split(",") == [str(c) for c in actions[option].choices], option
