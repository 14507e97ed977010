"""What the repository says about itself matches what is there: Makefile targets, the CI script."""

from __future__ import annotations

import re
import subprocess

from .conftest import REPO


def test_every_phony_name_is_a_makefile_target():
    text = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))
    assert phony and set(phony) <= targets, set(phony) - targets


def test_ci_names_the_slow_tests_it_leaves_out(tmp_path):
    """When the default suite eats the time budget, .ci/run lists the slow tests it skips and fails."""
    fake = tmp_path / "repo"
    (fake / ".ci").mkdir(parents=True)
    (fake / ".ci" / "run").write_text((REPO / ".ci" / "run").read_text())
    (fake / ".venv" / "bin").mkdir(parents=True)
    # `make test` takes "1800 s" (a fake date), pytest lists two slow tests
    (fake / "Makefile").write_text("test:\n\t@echo default suite\ntest-slow:\n\t@echo SLOW RAN\n")
    (fake / ".venv" / "bin" / "python").write_text("#!/bin/sh\necho 'tests/test_a.py::test_x'\n"
                                                   "echo 'tests/test_b.py::test_y'\n")
    (fake / ".venv" / "bin" / "python").chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    state = tmp_path / "calls"
    (bindir / "date").write_text(f"#!/bin/sh\nif [ -f {state} ]; then echo 1801; else touch {state}; echo 1; fi\n")
    (bindir / "date").chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(fake / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "NOT run" in proc.stdout and "tests/test_a.py::test_x" in proc.stdout and "tests/test_b.py::test_y" in proc.stdout
    assert "SLOW RAN" not in proc.stdout
    state.unlink()
    (bindir / "date").write_text(f"#!/bin/sh\nif [ -f {state} ]; then echo 60; else touch {state}; echo 1; fi\n")
    proc = subprocess.run(["bash", str(fake / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "SLOW RAN" in proc.stdout, proc.stdout + proc.stderr


def test_pytest_hides_only_named_warnings():
    """setup.cfg may hide known-harmless warnings of the pinned stack by message, never a whole category."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    filters = [f.strip() for f in cfg["tool:pytest"]["filterwarnings"].splitlines() if f.strip()]
    assert filters
    for f in filters:
        action, message, *_ = f.split(":")
        assert action != "ignore" or message.strip(), f"blanket filter: {f}"


DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _fuzz_counts() -> dict[str, int]:
    """The examples per target that tests/test_fuzz.py runs (read from its source: no import)."""
    import ast

    tree = ast.parse((REPO / "tests" / "test_fuzz.py").read_text())
    return {node.targets[0].id: sum(ast.literal_eval(node.value).values()) for node in tree.body
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in ("DEFAULT", "SLOW")}


def test_the_fuzz_counts_the_docs_give_are_the_code_s():
    text = (REPO / "docs" / "fault-tolerance.md").read_text()
    default = re.search(r"pytest -q tests/test_fuzz.py` tries ([\d,]+) seeded examples", text)
    slow = re.search(r"pytest -q -m slow tests/test_fuzz.py` tries ([\d,]+)", text)
    assert default and slow, "docs/fault-tolerance.md no longer states the fuzz counts"
    counts = _fuzz_counts()
    assert int(default.group(1).replace(",", "")) == counts["DEFAULT"]
    assert int(slow.group(1).replace(",", "")) == counts["SLOW"]


def test_every_results_file_and_link_the_docs_name_exists():
    """A figure is quoted with the file that holds it: every bench/results/ file and every relative
    link in the README, docs/ and bench/README.md must exist."""
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for name in re.findall(r"bench/results/[\w.\-]+\.(?:md|csv|json|png)", text):
            if not (REPO / name).is_file():
                missing.append(f"{doc.name}: {name}")
        for link in re.findall(r"\]\(([^)#\s]+)\)", text):
            if "://" not in link and not (doc.parent / link).exists():
                missing.append(f"{doc.name}: {link}")
    assert not missing, missing


def test_the_readme_stays_short_with_depth_in_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 12_000
    for page in ("training", "memory", "precision-and-devices", "fault-tolerance", "evaluation", "python-api"):
        assert f"docs/{page}.md" in readme and (REPO / "docs" / f"{page}.md").is_file()
