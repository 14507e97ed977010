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
