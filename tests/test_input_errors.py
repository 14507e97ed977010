"""Bad inputs the fuzzer (tests/test_fuzz.py) found ending in a traceback or a misleading message, pinned
one by one: each is one `error:` line naming the problem, exit code 2."""

from __future__ import annotations

import pytest
import yaml

from minitune import cli

from .conftest import tiny_config


def error_line(capsys, main, argv) -> str:
    """Run an entry point in-process; return its one `error:` line (asserting exit code 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def config_file(tmp_path):
    """Factory: a valid tiny config written to a file, with `edits` ({section: {key: value}}) applied."""

    def make(**edits) -> str:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_config("tiny-llama", tmp_path / "run", **edits), allow_unicode=True))
        return str(path)

    return make


# ---- config files


def test_folder_as_config_is_called_a_folder(capsys, tmp_path):
    line = error_line(capsys, cli.main_train, ["--config", str(tmp_path)])
    assert f"config file '{tmp_path}' is a folder, not a file" in line


@pytest.mark.parametrize("content", [bytes(range(128, 256)), "model: {preset: tiny-llama}".encode("utf-16")])
def test_config_that_is_not_utf8_text(capsys, tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    line = error_line(capsys, cli.main_train, ["--config", str(path)])
    assert f"config file '{path}' is not UTF-8 text (byte 0x" in line and "saved as UTF-8" in line


def test_config_with_a_character_yaml_refuses(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\x1f\n")
    line = error_line(capsys, cli.main_train, ["--config", str(path)])
    assert "character '\\x1f' at offset 21 is not allowed in YAML" in line


def test_integer_of_5000_digits(capsys, tmp_path, config_file):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: " + "1" * 5000 + "\n")
    assert "cannot be read as YAML: Exceeds the limit (4300 digits)" in error_line(
        capsys, cli.main_train, ["--config", str(path)])
    # as an override, the text is kept as a string and the type check names the key
    line = error_line(capsys, cli.main_train, ["--config", config_file(), "training.max_steps=" + "1" * 5000])
    assert "training.max_steps: expected an integer, got '111" in line


# ---- every message one printable line


def test_control_characters_in_a_message_are_escaped(capsys, config_file):
    line = error_line(capsys, cli.main_train, ["--config", config_file(model={"\x1e": 1})])
    assert line == "error: invalid config: unknown key 'model.\\x1e'"  # '\x1e' would split the line for some readers


@pytest.mark.parametrize("main, argv, text", [
    (cli.main_train, [], "error: give --config FILE"),
    (cli.main_train, ["--nope"], "error: unrecognized arguments: --nope (see train.py --help)"),
    (cli.main_eval, ["-p", "x", "--max-samples", "abc"], "error: argument --max-samples: invalid"),
])
def test_usage_errors_are_one_error_line(capsys, main, argv, text):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(text) and len(err.splitlines()) == 1, err
