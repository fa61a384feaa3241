"""CI runs the README's test command: keep the two identical."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    command = next(l for l in ci_lines if "pytest" in l and not l.startswith("#"))
    readme = (ROOT / "README.md").read_text()
    assert command in readme
    assert readme.index(command) < readme.index("## "), "the test command belongs at the top"
