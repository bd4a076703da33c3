"""The generated pages are fresh, and the README stays a guide."""
import re
import shutil
import subprocess
import sys

from tests.conftest import ROOT


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(cwd / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_generated_pages_are_fresh():
    """`make docs` on a clean checkout changes nothing: edit a docstring or a results file
    and forget to regenerate, and this fails naming the page."""
    for script in ("docs/reference.py", "benchmarks/report.py"):
        done = run(script, "--check")
        assert done.returncode == 0, done.stderr


def test_a_stale_page_is_named_and_regenerated(tmp_path):
    """In a copy of the tree: a changed docstring makes spec.md stale (--check exits 1,
    naming it), a results figure makes results.md and the README stale; regenerating
    mends both, and a results file without provenance stops the report."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "test-artifacts", "__pycache__", "*.egg-info", "scratch"))
    spec = tree / "study" / "spec.py"
    spec.write_text(spec.read_text().replace('"""Trials per family; every family gets the same budget."""',
                                             '"""Trials per family (changed)."""'))
    done = run("docs/reference.py", "--check", cwd=tree)
    assert done.returncode == 1 and "docs/spec.md is stale" in done.stderr
    assert run("docs/reference.py", cwd=tree).returncode == 0
    assert "Trials per family (changed)." in (tree / "docs" / "spec.md").read_text()

    result = tree / "benchmarks/results/cluster/static.json"
    result.write_text(result.read_text().replace('"ratio": ', '"ratio": 12.5, "old_ratio": ', 1))
    done = run("benchmarks/report.py", "--check", cwd=tree)
    assert done.returncode == 1 and "docs/results.md is stale" in done.stderr
    assert run("benchmarks/report.py", cwd=tree).returncode == 0
    assert "| wall time / local Ray | 12.50 |" in (tree / "docs" / "results.md").read_text()

    text = result.read_text().replace('"commit"', '"commit_missing"', 1)
    result.write_text(text)
    done = run("benchmarks/report.py", cwd=tree)
    assert done.returncode == 2 and "cluster/static.json lacks ['commit']" in done.stderr
    result.write_text(text.replace('"commit_missing"', '"commit"', 1))
    unquoted = tree / "benchmarks/results/quality/unquoted.json"  # no page reads it
    unquoted.write_text('{"date": "2026-01-01", "runs": {}}')
    done = run("benchmarks/report.py", "--check", cwd=tree)
    assert done.returncode == 2 and "quality/unquoted.json lacks ['commit', 'machine'" in done.stderr


def test_the_readme_is_a_guide_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    head = readme.splitlines()[:20]  # the two commands come first: a study, the tests
    assert any(line.startswith("make study ") for line in head)
    assert any(line.startswith("make test ") for line in head)
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", readme))
    assert pages <= linked, pages - linked
    for page in linked | {"LICENSE", "CHANGELOG.md"}:
        assert (ROOT / page).exists(), page


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_guide_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked here
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, broken
