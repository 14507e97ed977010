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
    (cli.main_train, [], "error: give --config NAME or FILE"),
    (cli.main_train, ["--nope"], "error: unrecognized arguments: --nope (see train.py --help)"),
    (cli.main_eval, ["-p", "x", "--max-samples", "abc"], "error: argument --max-samples: invalid"),
    # found past the weights before: generate() failed on them
    (cli.main_eval, ["-p", "x", "--temperature", "nan"], "error: generation.temperature: expected a finite number"),
    (cli.main_eval, ["-p", "x", "--temperature", "inf"], "error: generation.temperature: expected a finite number"),
    (cli.main_eval, ["-p", "x", "--top-p", "0"], "error: generation.top_p=0.0 must be in (0, 1]"),
    (cli.main_eval, ["-p", "x", "--no-repeat-ngram-size=-1"], "error: generation.no_repeat_ngram_size=-1 must be >= 0"),
    (cli.main_eval, ["-p", "x", "--seed", str(2**64)], "error: --seed 18446744073709551616 must be in [0, 2**32 - 1]"),
    (cli.main_eval, ["-p", "x", "--seed=-1"], "error: --seed -1 must be in [0, 2**32 - 1]"),
])
def test_usage_errors_are_one_error_line(capsys, main, argv, text):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(text) and len(err.splitlines()) == 1, err


# ---- names from registries, checked with the config (before anything loads), valid values listed


@pytest.mark.parametrize("edits, text", [
    ({"model": {"preset": "tiny-lama"}}, "model.preset='tiny-lama' is not one of flan-t5-small, "),
    ({"model": {"attn_implementation": "flash"}}, "model.attn_implementation='flash' is not one of eager, sdpa, "),
    ({"logging": {"trackers": ["tensorbord"]}}, "logging.trackers[0]='tensorbord' is not one of all, aim, "
                                                "tensorboard"),
    ({"logging": {"trackers": [""]}}, "logging.trackers[0]='' is not one of all,"),
    ({"training": {"seed": 2**32}}, "training.seed=4294967296 must be in [0, 2**32 - 1]"),
    ({"training": {"seed": -1}}, "training.seed=-1 must be in [0, 2**32 - 1]"),
    ({"optimizer": {"lr": float("nan")}}, "optimizer.lr: expected a finite number, got nan"),
    ({"training": {"max_grad_norm": float("inf")}}, "training.max_grad_norm: expected a finite number, got inf"),
    ({"lora": {"alpha": 10**400}}, "lora.alpha: expected a finite number, got 1000"),
    ({"training": {"max_steps": 2**64}}, "training.max_steps: 18446744073709551616 does not fit in 64 bits"),
    # these three passed the config and failed in the loop's first moments, after the weights loaded
    ({"optimizer": {"scheduler": "warmup_stable_decay"}}, "optimizer.scheduler='warmup_stable_decay' is not one of "
                                                          "linear, cosine, "),
    ({"data": {"num_workers": -1}}, "data.num_workers=-1 must be >= 0"),
    ({"optimizer": {"eps": -1}}, "optimizer.eps=-1.0 must be >= 0"),
])
def test_registry_names_and_ranges_are_checked_up_front(capsys, config_file, edits, text):
    line = error_line(capsys, cli.main_train, ["--config", config_file(**edits)])
    assert line.startswith("error: invalid config: ") and text in line


def test_preset_suggestion_and_hub_kernel(config_file):
    from minitune.config import load_config
    from minitune.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'tiny-llama'"):
        load_config(config_file(model={"preset": "tiny-lama"}))
    # an 'org/repo' attention implementation is a hub kernel: transformers resolves it
    assert load_config(config_file(model={"attn_implementation": "kernels-community/flash-attn"}))


def test_registries_match_the_libraries():
    from accelerate.utils import LoggerType
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from minitune.config import ATTENTION, TRACKERS

    assert set(TRACKERS) == set(LoggerType.list())
    assert set(ATTENTION) == {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}


# ---- checkpoints and sheets


@pytest.mark.parametrize("saved", ["(\n", "just text\n", "training: 5\n", b"\xff\xfe"])
def test_resume_from_a_checkpoint_whose_config_yaml_is_not_a_config(tmp_path, config_file, saved):
    from minitune.errors import CheckpointError
    from minitune.resume import saved_config

    ckpt = tmp_path / "checkpoint-000001"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_bytes(saved if isinstance(saved, bytes) else saved.encode())
    with pytest.raises(CheckpointError, match="has an unreadable config.yaml; delete that folder"):
        saved_config(ckpt)


def test_sheet_and_key_with_short_and_long_rows(capsys, tmp_path):
    sheet, key = tmp_path / "human_eval.csv", tmp_path / "human_eval_key.csv"
    sheet.write_text("id,prompt,output_a,output_b,score_a,score_b\n1,p,x,y,4\n2,p,x,y,1,2,extra\n")
    key.write_text("id,a,b,prompt_index\n1,base,tuned\n2,tuned,base,0\n\n3\n")
    assert cli.main_eval(["--scores", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "tuned" in out
    from minitune.evaluate import summarize_scores

    summary = summarize_scores(sheet)
    assert summary["models"]["base"] == {"mean": 3.0, "count": 2}  # 4 (row 1, A) and 2 (row 2, B)
    assert summary["models"]["tuned"] == {"mean": 1.0, "count": 1}


# ---- data files


def _data_error(tmp_path, name: str, content: bytes) -> str:
    from minitune.config import DataArgs
    from minitune.data import load_rows
    from minitune.errors import DataError

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_rows(DataArgs(path=str(path), validation_fraction=0.0))
    return str(e.value)


def test_malformed_jsonl_row_is_named_by_its_line(tmp_path):
    msg = _data_error(tmp_path, "d.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n')
    assert "data file" in msg and "d.jsonl', line 4: not valid JSON (" in msg and "fix or remove that line" in msg
    msg = _data_error(tmp_path, "e.jsonl", b'{"text": "a"}\n["text", "b"]\n')
    assert "e.jsonl', line 2: a JSON array, not an object" in msg


@pytest.mark.parametrize("content, named", [
    (b"null", "the whole file is a JSON null"),  # pyarrow 26's JSON reader segfaults on a leading null
    (b"\nnull\n{\"text\": \"a\"}\n", "line 2: a JSON null"),
    (b'{"text": "a"}\nnull\n', "line 2: a JSON null"),  # pyarrow would read it as a row of nulls
    (b'[{"text": "a"}, 3]', "item 1 of its list is a JSON number"),
])
def test_json_rows_that_are_not_objects_are_refused_before_pyarrow_reads_them(tmp_path, content, named):
    msg = _data_error(tmp_path, "d.json", content)
    assert named in msg and "not an object" in msg


def test_data_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    msg = _data_error(tmp_path, "d.csv", "text\nfine\ncaf\u00e9\n".encode("latin-1"))
    assert "d.csv', line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8" in msg


def test_data_read_error_names_the_cause_not_the_wrapper(tmp_path):
    msg = _data_error(tmp_path, "d.parquet", b"PAR1 not really parquet")
    assert "could not read" in msg and "as parquet: ArrowInvalid: " in msg and "DatasetGenerationError" not in msg
    assert "as json: it holds no rows" in _data_error(tmp_path, "d.jsonl", b"{}\n{}\n")


# ---- model paths


@pytest.mark.parametrize("edits, text", [
    ({"model": {"preset": None, "config_file": "no/such/config.json"}},
     "model.config_file 'no/such/config.json' does not exist: give the path of a model's config.json"),
    ({"model": {"preset": None, "config_file": "."}}, "model.config_file '.' is a folder, not a file"),
    ({"model": {"tokenizer": "tests/no/such-tokenizer"}}, "tokenizer 'tests/no/such-tokenizer' does not exist"),
    ({"model": {"preset": None, "name_or_path": "./no-such-model"}}, "model './no-such-model' does not exist"),
    ({"model": {"preset": None, "name_or_path": "nobody/no-such-model"}},
     "model 'nobody/no-such-model' is not in the local Hugging Face cache"),  # a hub id stays a hub id
])
def test_missing_local_paths_are_called_missing(capsys, config_file, edits, text):
    assert text in error_line(capsys, cli.main_train, ["--config", config_file(**edits)])


def test_config_file_that_is_not_a_model_config(capsys, tmp_path, config_file):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "no-such-architecture"}')
    line = error_line(capsys, cli.main_train, ["--config", config_file(model={"preset": None, "config_file": str(bad)})])
    assert f"model.config_file '{bad}' is not a model config transformers can read" in line


@pytest.mark.parametrize("content", [b'{"task_type": "CAUSAL_LM"\x82}', b"[1, 2]", b"\xff\xfe{}"])
def test_checkpoint_kind_from_a_corrupt_adapter_config(tmp_path, config_file, content):
    from minitune.config import load_config
    from minitune.errors import CheckpointError
    from minitune.evaluate.job import checkpoint_model_kind

    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="has an unreadable config .*; it is corrupt"):
        checkpoint_model_kind(tmp_path, load_config(config_file()))
    (tmp_path / "adapter_config.json").write_text('{"task_type": "SEQ_2_SEQ_LM"}')
    assert checkpoint_model_kind(tmp_path, load_config(config_file())) == "seq2seq"


@pytest.mark.parametrize("edits, text", [
    ({"model": {"kind": "seq2seq"}}, "model.kind=seq2seq does not fit a LlamaConfig model (Unrecognized configuration "
                                     "class"),
    ({"lora": {"r": 2**40}}, "lora.r=1099511627776 is larger than any linear layer of this model (the widest has "),
])
def test_model_settings_that_failed_when_the_model_was_built(capsys, config_file, edits, text):
    assert text in error_line(capsys, cli.main_train, ["--config", config_file(**edits)])


LONG = "1" * 5000  # longer than any file system's name limit: os.stat raises ENAMETOOLONG


@pytest.mark.parametrize("main, argv", [
    (cli.main_train, ["--config", LONG]),
    (cli.main_train, ["CONFIG", f"data.path={LONG}"]),
    (cli.main_train, ["CONFIG", f"data.path=a/{LONG}/b.jsonl"]),
    (cli.main_train, ["CONFIG", f"training.output_dir={LONG}"]),
    (cli.main_train, ["CONFIG", f"training.resume={LONG}"]),
    (cli.main_eval, ["-p", LONG]),
])
def test_a_path_too_long_for_the_file_system(capsys, config_file, main, argv):
    """Found by the slow fuzz (data.path=1...1): os.stat's OSError escaped as a traceback."""
    argv = ["--config", config_file(), *argv[1:]] if argv[0] == "CONFIG" else argv
    line = error_line(capsys, main, argv)
    assert "characters) is too long for this file system: give a shorter path" in line
    assert len(line) < 200  # the path is shortened in the message


@pytest.mark.parametrize("fix_text", [False, True])
def test_nested_keys_pyarrow_cannot_convert(capsys, config_file, tmp_path, fix_text):
    """Found by the slow fuzz: keys "" and "\\u0000" in one object are duplicate field names to pyarrow,
    which raised ValueError (a traceback) when the rows were read, with and without data.fix_text."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": {"": null, "\\u0000": null}}\n')
    line = error_line(capsys, cli.main_train, ["--config", config_file(), f"data.path={path}", "data.prompt='{text}'",
                                               "data.response=''", "data.validation_fraction=0",
                                               f"data.fix_text={str(fix_text).lower()}"])
    assert "cannot be read as Python objects" in line and "duplicate field names" in line
