"""minitune.run_folder: which output folders a run may write into (its resume, overwrite and
debris rules are exercised end to end in test_resume.py and test_bad_input.py)."""

from __future__ import annotations

import pytest

from minitune.config import load_config
from minitune.errors import RunError
from minitune.run_folder import check_output_dir

from .conftest import tiny_config


def test_check_output_dir_refuses_a_folder_with_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("")
    with pytest.raises(RunError, match="already holds a run"):
        check_output_dir(load_config(tiny_config(output_dir=tmp_path / "run")))
    assert check_output_dir(load_config(tiny_config(output_dir=tmp_path / "new"))) == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # checking creates nothing
