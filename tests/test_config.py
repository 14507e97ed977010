import configparser
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minitune.config import (
    SCHEDULERS,
    Config,
    config_path,
    load_config,
    parse_overrides,
    resolve_path,
    shipped_configs,
    validate,
)
from minitune.errors import ConfigError

from .conftest import REPO, tiny_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: tiny-llama\n  tokenizer: x\ndata:\n  path: d.jsonl\nlora:\n  r: 4\n")
    cfg = load_config(p, ["lora.r=16", "optimizer.lr=1e-4", "lora.target_modules=q,v", "training.epochs=2"])
    assert cfg.lora.r == 16
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q", "v"]
    assert cfg.training.epochs == 2.0 and isinstance(cfg.training.epochs, float)


def test_every_problem_in_one_error():
    with pytest.raises(ConfigError) as e:
        load_config({"model": {"presett": "x"}, "lora": {"r": 0, "dropout": 1.5},
                     "optimizer": {"name": "adamw_8bit", "lr": -1}, "trainin": {}})
    text = str(e.value)
    for fragment in ["'model.presett' (did you mean 'preset'?)", "lora.r=0", "lora.dropout=1.5",
                     "did you mean 'adamw8bit'", "optimizer.lr=-1.0", "unknown section 'trainin'",
                     "data.path is not set"]:
        assert fragment in text, fragment
    assert len(e.value.problems) >= 7


def test_names_from_peft_and_trainer_point_to_minitune_keys():
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config(), ["lora.lora_alpha=32", "lora.rank=8", "optimizer.learning_rate=1e-4",
                                    "training.gradient_accumulation_steps=4"])
    assert set(e.value.problems) == {
        "unknown key 'lora.lora_alpha' (did you mean 'alpha'?)", "unknown key 'lora.rank' (did you mean 'r'?)",
        "unknown key 'optimizer.learning_rate' (did you mean 'lr'?)",
        "unknown key 'training.gradient_accumulation_steps' (did you mean 'grad_accum'?)"}


def test_wrong_types():
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config(), ["training.batch_size=abc", "lora.use_dora=maybe", "lora.r=2.5"])
    assert {"training.batch_size: expected an integer, got 'abc'", "lora.use_dora: expected true/false, got 'maybe'",
            "lora.r: expected an integer, got 2.5"} <= set(e.value.problems)


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="needs LoRA"):
        load_config(tiny_config(), ["quantization.mode=4bit", "lora.enabled=false"])
    load_config(tiny_config(), ["data.packing=true", "data.mask_prompt=true"])  # packing keeps the prompt mask


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["lr=1"])


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  preset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(p)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: the first `training:` section would vanish."""
    p = tmp_path / "dup.yaml"
    p.write_text("training:\n  output_dir: runs/a\nmodel:\n  preset: tiny-llama\ntraining:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"line 5, column 1: duplicate key 'training' \(first at line 1, again at "
                       r"line 5\)") as e:
        load_config(p)
    assert len(e.value.problems) == 1
    p.write_text("model:\n  preset: tiny-llama\ntraining:\n  seed: 1\n  max_steps: 2\n  seed: 2\n")  # nested
    with pytest.raises(ConfigError, match=r"duplicate key 'seed' \(first at line 4, again at line 6\)"):
        load_config(p)
    # a YAML merge key may override what it merges: that is not a duplicate
    p.write_text("model:\n  preset: tiny-llama\ndata:\n  path: d.jsonl\n"
                 "training:\n  <<: {seed: 1, max_steps: 2}\n  seed: 3\n")
    cfg = load_config(p)
    assert (cfg.training.seed, cfg.training.max_steps) == (3, 2)


def test_schedulers_match_transformers():
    from transformers.trainer_utils import SchedulerType

    known = {s.value for s in SchedulerType}
    assert set(SCHEDULERS) <= known
    # the ones left out need extra arguments get_scheduler cannot take from our config
    assert known - set(SCHEDULERS) <= {"reduce_lr_on_plateau", "greedy", "cosine_with_min_lr",
                                       "cosine_warmup_with_min_lr", "warmup_stable_decay"}


def test_validate_python_config_and_roundtrip(tmp_path):
    cfg = validate(load_config(tiny_config()))
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    bad = Config()
    with pytest.raises(ConfigError):
        validate(bad)


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_a_config_name_is_a_shipped_config_and_a_file_that_exists_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    shipped = shipped_configs()
    assert list(shipped) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert config_path("bloom") == config_path("bloom.yaml") == shipped["bloom"] == REPO / "minitune/configs/bloom.yaml"
    assert load_config("tiny-llama") == load_config(shipped["tiny-llama"])
    (tmp_path / "bloom.yaml").write_text("model:\n  preset: tiny-llama\n  tokenizer: t\ndata:\n  path: d.jsonl\n")
    assert config_path("bloom.yaml") == Path("bloom.yaml")  # the file here, not the shipped one
    assert load_config("bloom.yaml").model.preset == "tiny-llama"
    assert config_path("bloom") == shipped["bloom"]  # no file is called just 'bloom'


@pytest.mark.parametrize("config, why", [
    ("bloomz", "no config shipped with minitune is named 'bloomz' (did you mean 'bloom'?)"),
    ("bloomz.yaml", "no config shipped with minitune is named 'bloomz' (did you mean 'bloom'?)"),
    ("elsewhere/bloom.yaml", "config file 'elsewhere/bloom.yaml' does not exist; shipped configs"),  # a path, not a name
])
def test_an_unknown_config_is_one_problem_listing_the_shipped_configs(config, why):
    with pytest.raises(ConfigError) as e:
        load_config(config)
    (problem,) = e.value.problems
    assert why in problem
    assert f"shipped configs (give the name): {', '.join(shipped_configs())} " in problem


def test_package_data_ships_every_file_of_the_shipped_folders():
    """setup.cfg's package_data patterns (globbed from the package folder, as setuptools does) cover
    every file in minitune/configs and minitune/assets: a config or data file added there is in the
    wheel, too."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    patterns = setup["options.package_data"]["minitune"].split()
    package = REPO / "minitune"
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    for folder, link in (("configs", "configs"), ("assets", "data")):
        files = {p for p in (package / folder).rglob("*") if p.is_file()}
        assert files and files <= shipped, sorted(str(p.relative_to(package)) for p in files - shipped)
        assert (REPO / link).resolve() == package / folder  # the repo's configs/ and data/ are these folders


def test_shipped_configs_name_only_shipped_files_or_hub_ids():
    """A shipped config runs from an installed wheel too: a file it names is 'pkg:' (found wherever
    minitune is installed, not from the working directory), and exists."""
    for name, path in shipped_configs().items():
        cfg = load_config(path)
        for key, value in (("model.tokenizer", cfg.model.tokenizer), ("data.path", cfg.data.path)):
            hub_id = value is not None and value.count("/") == 1 and not Path(value).suffix and ":" not in value
            if value is not None and not hub_id:
                assert value.startswith("pkg:") and Path(resolve_path(value, key)).exists(), (name, key, value)


def test_pkg_paths_are_folders_and_files_of_installed_packages():
    quotes = REPO / "minitune/assets/english_quotes.jsonl"
    assert resolve_path("pkg:minitune/assets/english_quotes.jsonl", "data.path") == str(quotes)
    assert resolve_path("pkg:minitune", "model.name_or_path") == str(REPO / "minitune")
    assert resolve_path("data/english_quotes.jsonl", "data.path") == "data/english_quotes.jsonl"  # not pkg: as is
    for value in ("pkg:no_such_package_xyz/x.jsonl", "pkg:", "pkg:no_such_parent_xyz.child"):
        with pytest.raises(ConfigError, match=f"data.path={value}: package '.*' is not installed"):
            resolve_path(value, "data.path")


def test_import_is_light():
    code = ("import sys, minitune; from minitune import load_config; "
            "load_config({'model': {'preset': 'tiny-llama'}, 'data': {'path': 'x.jsonl'}}); "
            "heavy = [m for m in ('bitsandbytes', 'peft', 'datasets', 'transformers', 'torch') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_string_keys_take_the_word_the_user_typed(tmp_path):
    # YAML 1.1 reads no/off/yes/on as booleans; a string key must get the text itself
    cfg = load_config(tiny_config(), ["training.mixed_precision=no", "model.kind=auto"])
    assert cfg.training.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  mixed_precision: no\n  overwrite: yes\n  compile: off\n" + yaml.safe_dump(
        {k: v for k, v in tiny_config().items() if k != "training"}))
    cfg = load_config(path)
    assert (cfg.training.mixed_precision, cfg.training.overwrite, cfg.training.compile) == ("no", True, False)
    # bool keys take the usual words, and nothing else
    assert load_config(tiny_config(), ["lora.use_rslora=on"]).lora.use_rslora is True
    with pytest.raises(ConfigError, match="lora.use_rslora: expected true/false, got 'maybe'"):
        load_config(tiny_config(), ["lora.use_rslora=maybe"])
    # a saved config (with 'no' quoted by the dumper) reads back the same
    saved = tmp_path / "saved.yaml"
    load_config(tiny_config(), ["training.mixed_precision=no"]).save(saved)
    assert load_config(saved).training.mixed_precision == "no"


def test_precision_defaults_are_auto():
    cfg = load_config({"model": {"preset": "tiny-llama"}, "data": {"path": "x.jsonl"}})
    assert (cfg.model.dtype, cfg.training.mixed_precision, cfg.quantization.compute_dtype) == ("auto",) * 3

def test_malformed_override_hint_is_itself_a_valid_override():
    with pytest.raises(ConfigError) as e:
        load_config(tiny_config(), ["lr"])
    hint = str(e.value).split("(e.g. ")[1].split(")")[0]
    assert hint == "optimizer.lr=1e-4"
    assert load_config(tiny_config(), [hint]).optimizer.lr == pytest.approx(1e-4)


def _declared(kind: str):
    from dataclasses import fields

    from minitune.config import SECTIONS

    return [(f"{section}.{f.name}", f) for section, cls in SECTIONS.items() for f in fields(cls) if f.metadata.get(kind)]


def test_each_choice_is_declared_once_with_its_field():
    """Validation and --help-config both read a key's choices from its field: a value outside them is
    refused with exactly that list, and the help line shows the same list."""
    from minitune.config import describe

    help_lines = describe().splitlines()
    declared = _declared("choices")
    assert len(declared) >= 15
    for key, f in declared:
        section, name = key.split(".")
        value = ["zzz"] if str(f.type).startswith("list") else "zzz"
        with pytest.raises(ConfigError) as e:
            load_config("tiny-llama", {section: {name: value}})
        where = f"{key}[0]" if isinstance(value, list) else key
        assert f"{where}='zzz' is not one of {', '.join(f.metadata['choices'])}" in str(e.value), key
        line = next(line for line in help_lines if line.startswith(f"  {name}:") and f.metadata["help"] in line)
        assert line.endswith(f"[one of: {', '.join(f.metadata['choices'])}]"), line


def test_each_range_is_declared_once_with_its_field():
    """A number outside a field's declared Range is refused, the message saying the range."""
    declared = _declared("valid")
    assert len(declared) >= 25
    for key, f in declared:
        section, name = key.split(".")
        valid = f.metadata["valid"]
        outside = (valid.low - 1 if valid.low is not None else valid.high + 1)
        value = int(outside) if str(f.type).startswith("int") else float(outside)
        with pytest.raises(ConfigError) as e:
            load_config("tiny-llama", {section: {name: value}})
        assert f"{key}={value} must be {valid.reads(isinstance(value, int))}" in str(e.value), (key, str(e.value))
