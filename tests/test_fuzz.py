"""Fuzz the input surface with hypothesis: no input may end in a traceback.

The property, for every target: the entry point returns 0 (the input got through every check up to
the point where weights would load, where the fuzz stops), or 2 with exactly one line starting with
`error:` (a config with several problems lists them below it, indented); never a traceback, never
another exit code; and the run or checkpoint folder it was pointed at is byte-for-byte unchanged.

Everything runs in-process (`cli.main_train` / `cli.main_eval`, or the data functions behind them,
with stdout and stderr captured), stopping where the model would be built, so an example costs
milliseconds (config, overrides, sheets) to ~0.2 s (data files, checkpoints).

Default run: a seeded, bounded number of examples per target (`DEFAULT`). Slow mode
(`pytest -m slow tests/test_fuzz.py`, optionally `MINITUNE_FUZZ_SCALE=2` for twice as many): `SLOW`
examples, >= 10,000 in all. The counts are printed at the end of the session (conftest.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shutil
import sys
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import minitune.checkpoint  # noqa: E402,F401  (every module whose functions `stop_at` patches)
import minitune.evaluate  # noqa: E402,F401
import minitune.memory  # noqa: E402,F401
import minitune.model  # noqa: E402,F401
import minitune.run  # noqa: E402,F401
from minitune import cli  # noqa: E402
from minitune.config import SECTIONS  # noqa: E402

from .conftest import GPT2, QUOTES, measured_config  # noqa: E402

# examples per target: default run / slow mode
DEFAULT = {"config_yaml": 40, "config_text": 40, "overrides": 40, "full_run": 4, "data": 25, "chat": 25, "checkpoint": 12,
           "sheet": 40, "eval_args": 10, "plan": 8}
SLOW = {"config_yaml": 2500, "config_text": 1500, "overrides": 2500, "full_run": 250, "data": 1500, "chat": 1000,
        "checkpoint": 400,
        "sheet": 1500, "eval_args": 300, "plan": 150}
SCALE = float(os.environ.get("MINITUNE_FUZZ_SCALE", "1"))

# target -> outcome -> examples run (printed by conftest.py at the end of the session)
COUNTS: dict[str, Counter] = defaultdict(Counter)


def _settings(target: str, mode: str):
    n = DEFAULT[target] if mode == "default" else max(1, int(SLOW[target] * SCALE))
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


MODES = ["default", pytest.param("slow", marks=pytest.mark.slow)]


# --------------------------------------------------------------------------------------------
# running an entry point and checking the property


class Reached(Exception):
    """The input passed every check up to the stage where the fuzz stops (`setup_model`: weights would load next)."""


def _reached(*args, **kwargs):
    raise Reached


@dataclass
class Outcome:
    rc: object
    out: str
    err: str
    shown: BaseException | None = None  # the exception the CLI printed as `error:` (exit 2)


# Exceptions that are never the user's input: one of them behind an `error:` line (as the cause or
# context of the user error shown) is an internal failure presented as bad input.
BUGS = (AttributeError, NameError, AssertionError, ZeroDivisionError, RecursionError, torch.OutOfMemoryError)


def _cause_chain(e: BaseException | None) -> list[BaseException]:
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def run(main, argv, *, stop: str = "load_model") -> Outcome:
    """Call `main(argv)` with stdout/stderr captured and `stop` (a function name) raising Reached in every
    minitune module that holds it, so that nothing past that point (weights) runs."""
    out, err = io.StringIO(), io.StringIO()
    shown: list[BaseException] = []

    def printing(*args, **kwargs):  # the CLI prints `error:` inside its except block: keep what it caught
        if sys.exc_info()[1] is not None:
            shown.append(sys.exc_info()[1])
        print(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name, module in list(sys.modules.items()):
            if (name == "minitune" or name.startswith("minitune.")) and hasattr(module, stop):
                mp.setattr(module, stop, _reached)
        mp.setattr(cli, "print", printing, raising=False)
        try:
            rc = main(argv)
        except Reached:
            rc = 0
        except SystemExit as e:  # argparse
            rc = e.code
        except Exception:
            rc = "traceback"
            err.write(traceback.format_exc())
    return Outcome(rc, out.getvalue(), err.getvalue(), shown[-1] if shown else None)


def check(target: str, o: Outcome, folder: Path | None = None, before: dict | None = None) -> None:
    """The property: exit 0, or exit 2 with one `error:` line; no traceback; `folder` unchanged."""
    text = o.out + o.err
    if os.environ.get("FUZZ_DEBUG"):
        print(target, o.rc, o.err[-300:], file=sys.__stderr__)
    COUNTS[target]["tracebacks" if o.rc == "traceback" or "Traceback" in text else f"exit {o.rc}"] += 1
    assert "Traceback" not in text, text[-4000:]
    assert o.rc in (0, 2), text[-4000:]
    if o.rc == 2:
        lines = o.err.splitlines()
        errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
        assert len(errors) == 1, o.err[-4000:]
        rest = lines[errors[0] + 1:]
        assert all(line.startswith("  - ") for line in rest), o.err[-4000:]  # a config's list of problems
        bugs = [e for e in _cause_chain(o.shown) if isinstance(e, BUGS)]
        assert not bugs, f"an internal failure shown as bad input: {bugs[0]!r} behind {o.err.strip()[:300]}"
    if folder is not None:
        assert snapshot(folder) == before, f"{folder} changed"


def snapshot(folder: Path) -> dict[str, bytes | None]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# --------------------------------------------------------------------------------------------
# values


WORDS = ["", " ", "auto", "none", "null", "~", "yes", "no", "on", "off", "true", "False", "nan", ".nan", ".inf",
         "-.inf", "1e-4", "1e400", "0x1F", "0o17", "1_000", "-1", "0", "2e-5", "\t", "\x00", "\u2028", "💥", "ä",
         "../..", "/", "/dev/null", "con", "q,v", "[a, b]", "{a: 1}", "&a", "*a", "!!python/object:os.system",
         "tiny-llama", "opt-125m", "sdpa", "eager", "tensorboard", "wandb", "bfloat16", "float16", "fp16", "bf16",
         "nf4", "fp4", "4bit", "8bit", "cpu", "cuda", "mps", "cosine", "adamw8bit", "paged_adamw8bit", "lion8bit"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 70), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 2**32, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1),
    st.text(max_size=12), st.sampled_from(WORDS),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6) | st.sampled_from(WORDS), inner, max_size=3), max_leaves=6)

KEYS = {section: [f.name for f in fields(cls)] for section, cls in SECTIONS.items()}
FIELD_TYPES = {(section, f.name): str(f.type) for section, cls in SECTIONS.items() for f in fields(cls)}


def plausible(section: str, key: str):
    """Values of the key's own type (so that examples get past the type checks, into deeper code)."""
    tp = FIELD_TYPES.get((section, key), "")
    if tp.startswith("bool"):
        return st.booleans() | st.sampled_from(["yes", "no", "on", "off"])
    if tp.startswith("int"):
        return st.integers(0, 64) | st.sampled_from([-1, 2**32, 2**63, 10**30])
    if tp.startswith("float"):
        return st.floats(0, 1) | st.sampled_from([0, 1, 1e-4, 1e308, float("inf"), float("nan")])
    if tp.startswith("list"):
        return st.lists(st.sampled_from(WORDS), max_size=3)
    return st.sampled_from(WORDS)


def base_config(out: Path) -> dict:
    return measured_config("tiny-llama", out, data={"max_samples": 16, "path": QUOTES},
                       model={"tokenizer": GPT2}, training={"max_steps": 2})


@st.composite
def config_docs(draw, out: Path):
    """A tiny, valid config with a few random edits: keys added, replaced or removed; sections replaced."""
    doc = base_config(out)
    doc["training"]["overwrite"] = draw(st.booleans())  # else most examples stop at "already holds a run"
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        known = draw(st.integers(0, 9)) < 8  # mostly known sections and keys: deeper checks get their turn
        section = draw(st.sampled_from(list(KEYS)) if known else st.text(max_size=8) | st.sampled_from(WORDS))
        what = draw(st.sampled_from(["set", "set", "set", "set", "set", "delete", "section"]))
        if what == "section":
            doc[section] = draw(values)
        elif what == "delete" and isinstance(doc.get(section), dict) and doc[section]:
            doc[section].pop(draw(st.sampled_from(sorted(doc[section]))))
        else:
            key = draw(st.sampled_from(KEYS.get(section) or ["x"]) if known else st.text(max_size=8))
            if not isinstance(doc.get(section), dict):
                doc[section] = {}
            doc[section][key] = draw(plausible(section, key) if draw(st.booleans()) else values)
    if draw(st.integers(0, 30)) == 30:
        doc = draw(values)  # not a mapping of sections at all
    return doc


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A folder that looks like a previous run (config, log, an incomplete checkpoint): it must stay as it is."""
    out = tmp_path_factory.mktemp("fuzz-run") / "run"
    (out / "checkpoint-000001").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(base_config(out)))
    (out / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out / "checkpoint-000001" / "trainer_state.json").write_text('{"step": 1}')
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Run every example from an empty folder (relative paths land there); datasets' cache goes there too."""
    import datasets

    cwd = tmp_path_factory.mktemp("fuzz-cwd")
    old = os.getcwd()
    old_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(cwd / ".hf-datasets-cache")
    datasets.disable_progress_bars()
    os.chdir(cwd)
    yield cwd
    os.chdir(old)
    datasets.config.HF_DATASETS_CACHE = old_cache
    datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------
# 1. config: YAML documents, raw bytes, overrides


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_config_documents(mode, fake_run, workdir):
    """Structured YAML documents (a valid config, randomly edited) through `train.py --config`."""
    cfg_file = workdir / "config.yaml"
    before = snapshot(fake_run)

    @_settings("config_yaml", mode)
    @given(doc=config_docs(fake_run), unicode=st.booleans())
    def example(doc, unicode):
        cfg_file.write_text(yaml.safe_dump(doc, allow_unicode=unicode), encoding="utf-8")
        check("config_yaml", run(cli.main_train, ["--config", str(cfg_file)], stop="setup_model"), fake_run, before)

    example()


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_config_bytes(mode, fake_run, workdir):
    """Config files as raw bytes: any text, YAML-looking text, other encodings, binary, folders."""
    good = yaml.safe_dump(base_config(fake_run))
    cfg_file = workdir / "raw.yaml"
    before = snapshot(fake_run)

    @_settings("config_text", mode)
    @given(kind=st.sampled_from(["text", "bytes", "cut", "encoding", "yamlish", "folder"]),
           text=st.text(max_size=200), blob=st.binary(max_size=200), frac=st.floats(0, 1),
           encoding=st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252", "utf-8-sig"]),
           yamlish=st.lists(st.sampled_from(["model:", "  preset: tiny-llama", "data: [", "- a", ": b", "'",
                                             "\"", "!!binary", "*x", "&x a", "? k", "  -", "\t", "%YAML 1.1",
                                             "---", "...", "{a: [}", "training: {output_dir: /}"]), max_size=8))
    def example(kind, text, blob, frac, encoding, yamlish):
        if cfg_file.is_dir():
            cfg_file.rmdir()
        if kind == "text":
            cfg_file.write_text(text, encoding="utf-8", errors="surrogatepass")
        elif kind == "bytes":
            cfg_file.write_bytes(blob)
        elif kind == "cut":
            cfg_file.write_text(good[: int(len(good) * frac)])
        elif kind == "encoding":
            cfg_file.write_bytes((good + "# ünïcode ✓\n").encode(encoding, errors="replace"))
        elif kind == "yamlish":
            cfg_file.write_text("\n".join(yamlish))
        else:
            cfg_file.unlink(missing_ok=True)
            cfg_file.mkdir()
        check("config_text", run(cli.main_train, ["--config", str(cfg_file)], stop="setup_model"), fake_run, before)

    example()


DOTTED = [f"{s}.{k}" for s, keys in KEYS.items() for k in keys]
override_values = st.one_of(
    st.text(max_size=16), st.sampled_from(WORDS), st.integers().map(str), st.floats().map(repr),
    st.sampled_from(["2**64", str(2**64), str(10**400), "1" * 5000, "[" * 50, "{" * 20, "- a\n- b", "a: b: c"]),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_overrides(mode, fake_run, workdir):
    """`section.key=value` overrides over a valid config file: known and unknown keys, any value text."""
    cfg_file = workdir / "base.yaml"
    doc = base_config(fake_run)
    doc["training"]["overwrite"] = True
    cfg_file.write_text(yaml.safe_dump(doc))
    before = snapshot(fake_run)
    typed = st.sampled_from(DOTTED).flatmap(lambda k: plausible(*k.split(".")).map(
        lambda v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"))
    items = st.one_of(
        typed, typed, typed,
        st.tuples(st.sampled_from(DOTTED), override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.tuples(st.text(max_size=12), override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.text(max_size=20).filter(lambda s: not s.startswith("-")),
    )

    @_settings("overrides", mode)
    @given(overrides=st.lists(items, max_size=4), with_config=st.integers(0, 9))
    def example(overrides, with_config):
        argv = (["--config", str(cfg_file)] if with_config else []) + ["--", *overrides]
        check("overrides", run(cli.main_train, argv, stop="setup_model"), fake_run, before)

    example()


# keys a whole run may take any value of its type for (not: run length, model size, output folder, workers)
FULL_RUN_KEYS = [k for k in DOTTED if k not in {
    "model.name_or_path", "model.gguf_file", "model.tokenizer", "model.preset", "model.config_file",
    "model.trust_remote_code", "data.path", "data.max_samples", "data.num_workers", "training.output_dir",
    "training.max_steps", "training.epochs", "training.compile", "training.resume", "training.overwrite"}]


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_full_runs(mode, fake_run, workdir):
    """Whole tiny runs (1-2 steps, past the weights) with typed random values: what the config accepts trains
    (exit 0) or stops itself with one error line (exit 2, a run that diverged); what fails before training is
    one error line with exit 2, and the run folder it was to replace is intact."""
    counter = iter(range(10**9))
    typed = st.sampled_from(FULL_RUN_KEYS).flatmap(lambda k: st.tuples(st.just(k), plausible(*k.split("."))))

    @_settings("full_run", mode)
    @given(edits=st.lists(typed, min_size=1, max_size=3))
    def example(edits):
        out = workdir / f"full-{next(counter)}"
        shutil.copytree(fake_run, out)
        try:
            doc = measured_config("tiny-llama", out, data={"max_samples": 8},
                              training={"max_steps": 2, "overwrite": True, "eval_batches": 1})
            for key, value in edits:
                section, name = key.split(".")
                doc.setdefault(section, {})[name] = value
            cfg_file = workdir / "full.yaml"
            cfg_file.write_text(yaml.safe_dump(doc))
            before = snapshot(out)
            o = run(cli.main_train, ["--config", str(cfg_file)], stop="no such function")
            # a run that trained and then stopped itself (e.g. optimizer.lr=1e308: every step non-finite) has
            # replaced the old run, as training.overwrite=true asks; any other exit 2 must leave it intact
            stopped = "error: stopped: " in o.err
            check("full_run", o, out if o.rc == 2 and not stopped else None, before)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    example()


# --------------------------------------------------------------------------------------------
# 2. data files


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=30), st.sampled_from(["", " ", "\n", "hello world", "💥" * 3]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=5)
COLUMNS = ["text", "quote", "tags", "author", ""]
rows_strategy = st.lists(st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=5),
                                         json_values | st.text(min_size=200, max_size=2000), max_size=4),
                         min_size=1, max_size=6)


def _cell(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else v


@st.composite
def data_files(draw, folder: Path) -> Path:
    """One data file (or a folder of them) in any supported format, well formed or not."""
    fmt = draw(st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md"]))
    rows = draw(rows_strategy)
    # half of the files are well formed, so that the other half's damage is not all the fuzz ever sees
    damage = draw(st.sampled_from(["cut", "garbage-line", "binary", "encoding", "empty"])) if draw(st.booleans()) \
        else "none"
    if fmt in (".jsonl", ".md"):
        body = "".join(json.dumps(r, ensure_ascii=draw(st.booleans())) + "\n" for r in rows).encode()
    elif fmt == ".json":
        shape = draw(st.sampled_from(["list", "list", "dict", "scalar"]))
        body = json.dumps(rows if shape == "list" else {"data": rows} if shape == "dict" else draw(json_values)).encode()
    elif fmt in (".csv", ".tsv"):
        cols = sorted({c for r in rows for c in r})
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if fmt == ".tsv" else ",")
        if draw(st.booleans()) or not cols:
            w.writerow(cols)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in cols])
        body = buf.getvalue().encode("utf-8", errors="surrogatepass")
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = sorted({c for r in rows for c in r if c})
        columns = {c: [None if r.get(c) is None else str(_cell(r.get(c))) for r in rows] for c in cols}
        if draw(st.booleans()) and cols:  # a nested (list) column
            columns[cols[0]] = [[str(_cell(r.get(cols[0])))] for r in rows]
        sink = io.BytesIO()
        pq.write_table(pa.table(columns) if columns else pa.table({"text": pa.array([], pa.string())}), sink)
        body = sink.getvalue()
    else:
        lines = draw(st.lists(st.text(max_size=40) | st.text(min_size=500, max_size=3000, alphabet="ab c\t"),
                              max_size=6))
        body = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    if damage == "cut":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif damage == "garbage-line":
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + b"\n{not json, 'x': }\n" + body[cut:]
    elif damage == "binary":
        body = draw(st.binary(min_size=1, max_size=300))
    elif damage == "encoding":
        body = body.decode("utf-8", errors="replace").encode(draw(st.sampled_from(["utf-16", "latin-1", "utf-32"])),
                                                            errors="replace")
    elif damage == "empty":
        body = b""
    target = folder / f"data{fmt}"
    if draw(st.integers(0, 9)) == 9:  # a folder of files named after splits
        target = folder / "splits"
        target.mkdir()
        for split in draw(st.lists(st.sampled_from(["train", "validation", "test", "extra"]), min_size=1, max_size=3,
                                   unique=True)):
            (target / f"{split}{fmt}").write_bytes(body)
        return target
    target.write_bytes(body)
    return target


data_settings = st.fixed_dictionaries({
    "prompt": st.sampled_from(["{text}", "{quote} ->: ", "{nope}", "{}", "{text:.2f}", "{text[0]}", "{{text}}",
                               "{tags}", "{", "text", ""]),
    "response": st.sampled_from(["", "", "{tags}", "{text}", "{author}!", "{0}"]),
    "max_length": st.sampled_from([1, 2, 4, 16, 64]),
    "max_target_length": st.sampled_from([1, 4, 16]),
    "packing": st.sampled_from([False, False, False, True]),
    "mask_prompt": st.sampled_from([False, False, False, True]),
    "add_eos": st.booleans(),
    "group_by_length": st.booleans(),
    "validation_fraction": st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    "validation_split": st.sampled_from([None, None, "validation", "test", "nope"]),
    "split": st.sampled_from(["train", "train", "train", "validation", "nope"]),
    "max_samples": st.sampled_from([None, None, 1, 3]),
    "fix_text": st.booleans(),
})


@pytest.fixture(scope="module")
def tokenizers():
    from minitune.config import ModelArgs
    from minitune.model import load_tokenizer

    from .conftest import T5_TOK

    return {False: load_tokenizer(ModelArgs(tokenizer=GPT2)), True: load_tokenizer(ModelArgs(tokenizer=T5_TOK))}


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_data_files(mode, workdir, tokenizers):
    """Data files of every format, well formed or damaged, with any template settings, through load + tokenize."""
    from minitune.config import load_config
    from minitune.data import build_data

    counter = iter(range(10**9))

    simple = st.fixed_dictionaries({"prompt": st.just("{text}"), "response": st.sampled_from(["", "{tags}"]),
                                    "validation_fraction": st.just(0.0), "packing": st.booleans(),
                                    "mask_prompt": st.just(False)})

    @_settings("data", mode)
    @given(data=st.data(), knobs=st.one_of(simple, data_settings), seq2seq=st.booleans())
    def example(data, knobs, seq2seq):
        folder = workdir / f"data-{next(counter)}"
        folder.mkdir()
        try:
            path = data.draw(data_files(folder))
            overrides = {"model": {"preset": "tiny-t5" if seq2seq else "tiny-llama"},
                         "data": {**knobs, "path": str(path)}}

            def load():  # as train() does: the config's checks, then rows -> tokens
                cfg = load_config(base_config(workdir / "unused"), overrides)
                build_data(cfg.data, tokenizers[seq2seq], seq2seq=seq2seq, batch_size=2)

            check("data", run(lambda argv: cli.run_cli(load), []), folder, snapshot(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    example()


roles = st.sampled_from(["system", "user", "assistant", "tool", "narrator", "", "USER"]) | st.text(max_size=6)
turns = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": st.text(max_size=60) | st.sampled_from(["", " ", "<|im_end|>"])}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3),
    json_scalars,
)
chat_rows = st.lists(st.one_of(
    st.fixed_dictionaries({"messages": st.lists(turns, max_size=5) | json_values}),
    st.fixed_dictionaries({"quote": st.text(max_size=80), "tags": st.lists(st.text(max_size=10), max_size=3)}),
), min_size=1, max_size=6)


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_chat_rows(mode, workdir):
    """Chat-format data (data.chat_template=true) with the SmolLM2 tokenizer: `messages` cells of any
    shape (roles the template refuses, non-text content, no assistant turn, not a list) and
    prompt/response rows, with any system prompt, loss mask and length."""
    from minitune.config import ModelArgs, load_config
    from minitune.data import build_data
    from minitune.model import load_tokenizer

    tokenizer = load_tokenizer(ModelArgs(tokenizer=str(Path(QUOTES).parent / "tokenizers/smollm2-135m-instruct")))
    counter = iter(range(10**9))

    @_settings("chat", mode)
    @given(rows=chat_rows, system=st.text(max_size=20), assistant_only=st.booleans(),
           max_length=st.integers(1, 96), response=st.sampled_from(["", "{tags}"]))
    def example(rows, system, assistant_only, max_length, response):
        path = workdir / f"chat-{next(counter)}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        overrides = {"data": {"path": str(path), "chat_template": True, "system_prompt": system, "prompt": "{quote}",
                              "response": response, "assistant_only_loss": assistant_only,
                              "max_length": max_length, "validation_fraction": 0.0}}

        def load():
            cfg = load_config(base_config(workdir / "unused"), overrides)
            build_data(cfg.data, tokenizer, seq2seq=False, batch_size=2)

        try:
            check("chat", run(lambda argv: cli.run_cli(load), []))
        finally:
            path.unlink()

    example()


# --------------------------------------------------------------------------------------------
# 3. checkpoint folders


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A real 2-step run with a step checkpoint and final/ (tiny Llama, LoRA)."""
    from minitune.run import train

    out = tmp_path_factory.mktemp("fuzz-ckpt") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(measured_config("tiny-llama", out, data={"max_samples": 8},
                          training={"max_steps": 2, "save_every": 1, "keep_last": 1, "eval_batches": 1}))
    return out


def _unfold(path: Path) -> None:
    """A file that an earlier "folder" damage turned into a folder becomes writable again."""
    if path.is_dir():
        shutil.rmtree(path)


def _damage(path: Path, op: str, rnd: random.Random, blob: bytes) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    victim = rnd.choice(files) if files else path / "x"
    if op == "delete" and files:
        victim.unlink()
    elif op == "truncate" and files:
        victim.write_bytes(victim.read_bytes()[: rnd.randrange(max(1, victim.stat().st_size))])
    elif op == "flip" and files:
        data = bytearray(victim.read_bytes())
        for _ in range(rnd.randint(1, 8)):
            if data:
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        victim.write_bytes(bytes(data))
    elif op == "replace":
        victim.write_bytes(blob)
    elif op == "folder" and files:
        victim.unlink()
        victim.mkdir()
    elif op == "foreign":
        name = rnd.choice(["model.safetensors", "README.md", "checkpoint-999999", "COMPLETE", ".hidden",
                           "adapter_model.bin", "training_state_1.pt", "pytorch_model.bin", "config.json"])
        _unfold(path / name)
        (path / name).write_bytes(blob)
    elif op == "state":
        _unfold(path / "trainer_state.json")
        (path / "trainer_state.json").write_text(json.dumps(rnd.choice([[], {}, {"step": "x"}, {"step": -1},
                                                                        {"step": 10**30}, {"step": None}, 7])))
    elif op == "config":
        _unfold(path / "config.yaml")
        (path / "config.yaml").write_bytes(blob if rnd.random() < 0.5 else b"model: {preset: nope}\n")
    elif op == "empty":
        shutil.rmtree(path)
        path.mkdir()


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_checkpoints(mode, real_run, workdir):
    """Damaged checkpoint folders (missing, truncated, corrupt or foreign files) given to `training.resume`
    and to `eval.py -p`; a run folder whose newest checkpoint is damaged, resumed with `resume=auto` (up to
    where the weights load, or through the whole resume and one more step)."""
    cfg_file = workdir / "resume.yaml"
    counter = iter(range(10**9))

    @_settings("checkpoint", mode)
    @given(ops=st.lists(st.sampled_from(["delete", "truncate", "flip", "replace", "folder", "foreign", "state",
                                         "config", "empty"]), min_size=1, max_size=3),
           seed=st.integers(0, 2**16), blob=st.binary(max_size=64),
           which=st.sampled_from(["final", "checkpoint-000002"]),
           entry=st.sampled_from(["resume", "auto", "eval", "auto-full"]))
    def example(ops, seed, blob, which, entry):
        run_dir = workdir / f"ckpt-{next(counter)}"
        shutil.copytree(real_run, run_dir)
        try:
            rnd = random.Random(seed)
            for op in ops:
                _damage(run_dir / which, op, rnd, blob)
            before = snapshot(run_dir)
            if entry == "eval":
                argv = ["-p", str(run_dir / which), "--no-progress", "--num-prompts", "1", "--max-samples", "2"]
                o = run(cli.main_eval, argv, stop="load_model")
            else:
                cfg_file.write_text(yaml.safe_dump(measured_config("tiny-llama", run_dir, data={"max_samples": 8},
                                                               training={"max_steps": 3})))
                resume = str(run_dir / which) if entry == "resume" else "auto"
                # auto-full: past the weights, into load_checkpoint and one more step
                stop = "no such function" if entry == "auto-full" else "MemoryProfiler"
                o = run(cli.main_train, ["--config", str(cfg_file), f"training.resume={resume}"], stop=stop)
            check("checkpoint", o, run_dir if o.rc == 2 or entry != "auto-full" else None, before)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    example()


# --------------------------------------------------------------------------------------------
# 4. human-evaluation sheets and eval.py arguments

SHEET = ["id", "prompt", "output_a", "output_b", "score_a", "score_b"]
KEY = ["id", "a", "b", "prompt_index"]
cells = st.one_of(st.text(max_size=10), st.sampled_from(["", "0", "5", "5.0", "6", "-1", "nan", "inf", "1e309",
                                                         "3,5", " 4 ", "base", "tuned", "fine-tuned", "1", "2"]))


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_sheets(mode, workdir):
    """`eval.py --scores`: sheets and keys with any header, rows, scores, encoding; the sheet is never changed."""
    folder = workdir / "sheets"
    folder.mkdir(exist_ok=True)

    @_settings("sheet", mode)
    @given(header=st.sampled_from([SHEET, SHEET[::-1], SHEET[:4], SHEET + ["extra"], []]) | st.lists(cells, max_size=7),
           rows=st.lists(st.lists(cells, max_size=8), max_size=6),
           key_header=st.sampled_from([KEY, KEY[:2], []]), key_rows=st.lists(st.lists(cells, max_size=5), max_size=6),
           damage=st.sampled_from(["none", "none", "binary", "utf-16", "no-key", "key-folder", "no-sheet"]),
           blob=st.binary(max_size=100), key_arg=st.booleans())
    def example(header, rows, key_header, key_rows, damage, blob, key_arg):
        shutil.rmtree(folder)
        folder.mkdir()
        sheet, key = folder / "human_eval.csv", folder / "human_eval_key.csv"
        for path, head, body in ((sheet, header, rows), (key, key_header, key_rows)):
            buf = io.StringIO()
            w = csv.writer(buf)
            if head:
                w.writerow(head)
            w.writerows(body)
            path.write_text(buf.getvalue(), encoding="utf-8", errors="surrogatepass")
        if damage == "binary":
            sheet.write_bytes(blob)
        elif damage == "utf-16":
            sheet.write_bytes(sheet.read_text(encoding="utf-8", errors="surrogateescape").encode("utf-16", "replace"))
        elif damage == "no-key":
            key.unlink()
        elif damage == "key-folder":
            key.unlink()
            key.mkdir()
        elif damage == "no-sheet":
            sheet.unlink()
        before = snapshot(folder)
        argv = ["--scores", str(sheet)] + (["--key", str(key)] if key_arg else [])
        check("sheet", run(cli.main_eval, argv), folder, before)

    example()


EVAL_FLAGS = ["--data", "--split", "--max-samples", "--batch-size", "--num-prompts", "--prompts", "--max-new-tokens",
              "--temperature", "--top-p", "--repetition-penalty", "--no-repeat-ngram-size", "--stop", "--seed", "--out",
              "--merge-to", "--device", "--key"]
flag_values = st.one_of(st.sampled_from(["0", "1", "-1", "2", "0.5", "1e309", "nan", "inf", "-inf", str(2**64),
                                         "abc", "", "train", "validation", "cpu", "cuda", "mps", "auto", "/",
                                         "prompts.txt", "out", "merged", "nope.jsonl", QUOTES]), st.text(max_size=8))


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_eval_arguments(mode, real_run, workdir):
    """`eval.py -p CHECKPOINT` with any options and values (stops where the model would load)."""
    (workdir / "prompts.txt").write_text("one prompt\n\nanother\n")
    ckpt = real_run / "final"
    before = snapshot(real_run)

    @_settings("eval_args", mode)
    @given(flags=st.lists(st.tuples(st.sampled_from(EVAL_FLAGS), flag_values), max_size=4),
           switches=st.lists(st.sampled_from(["--no-sheet", "--no-progress", "--help-nope", "-p"]), max_size=2),
           overrides=st.lists(st.sampled_from(["data.max_length=8", "training.device=cpu", "x=1", "data.nope=1",
                                               "lora.r=0", "training.seed=-5", "model.dtype=float64"]), max_size=2))
    def example(flags, switches, overrides):
        shutil.rmtree(workdir / "out", ignore_errors=True)
        shutil.rmtree(workdir / "merged", ignore_errors=True)
        argv = ["-p", str(ckpt), "--no-progress", "--max-samples", "4"]
        for flag, value in flags:
            argv += [flag, value] if not value.startswith("-") else [f"{flag}={value}"]
        argv += switches + ["--", *overrides] if overrides else switches
        check("eval_args", run(cli.main_eval, argv), real_run, before)

    example()


@pytest.mark.parametrize("bug", [AttributeError("a planner bug"), torch.OutOfMemoryError("out of memory")])
def test_the_property_fails_on_an_internal_failure_shown_as_bad_input(bug, fake_run, workdir, monkeypatch):
    """An internal failure inside the planner's simulation must not pass the property as bad input
    (exit 2, one `error:` line): it keeps its traceback, so `check` fails on it."""
    import minitune.planner.planning

    cfg_file = workdir / "plan-bug.yaml"
    cfg_file.write_text(yaml.safe_dump(base_config(fake_run)))

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(minitune.planner.planning, "simulate", broken)  # what plan() calls
    outcome = run(cli.main, ["plan", "--config", str(cfg_file), "--device", "T4"], stop="_nothing_stops_a_plan")
    assert outcome.rc == "traceback" and type(bug).__name__ in outcome.err, outcome
    with pytest.raises(AssertionError):
        check("internal", outcome)
    COUNTS.pop("internal", None)
    # and the property itself sees a bug wrapped into a user error, even one raised `from None`
    wrapped = Outcome(2, "", "error: could not simulate this config\n", _wrapped(bug))
    with pytest.raises(AssertionError, match="internal failure shown as bad input"):
        check("internal", wrapped)
    COUNTS.pop("internal", None)


def _wrapped(bug: BaseException) -> BaseException:
    from minitune.errors import PlanError

    try:
        try:
            raise bug
        except Exception:
            raise PlanError("could not simulate this config") from None
    except PlanError as e:
        return e


def test_counts_cover_every_target():
    """The summary (printed by conftest.py) names every target; a run that skipped one would show it."""
    assert set(DEFAULT) == set(SLOW)
    assert sum(SLOW.values()) >= 10_000


@pytest.mark.parametrize("mode", MODES)
def test_fuzz_plan(mode, fake_run, workdir):
    """`minitune plan`: any device name, budget text, flags and overrides over a valid config. The plan
    runs for real (a tiny model on fake tensors): any answer or one error line, never a traceback."""
    cfg_file = workdir / "plan.yaml"
    cfg_file.write_text(yaml.safe_dump(base_config(fake_run)))
    typed = st.sampled_from(DOTTED).flatmap(lambda k: plausible(*k.split(".")).map(
        lambda v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"))
    devices = st.one_of(st.sampled_from(["T4", "h100", "M4-16", "cpu", "mps", "A100-80", "rtx4090"]),
                        st.text(max_size=10))
    budgets = st.one_of(st.sampled_from(["1MiB", "12GiB", "0.5 GB", "1e3", "-1", "0", "2**64", "1" * 400]),
                        st.text(max_size=10))

    @_settings("plan", mode)
    @given(device=st.none() | devices, budget=st.none() | budgets, as_json=st.booleans(),
           overrides=st.lists(typed, max_size=2))
    def example(device, budget, as_json, overrides):
        argv = ["plan", "--config", str(cfg_file), *(["--device", device] if device is not None else []),
                *(["--budget", budget] if budget is not None else []), *(["--json"] if as_json else []),
                "--", *overrides]
        check("plan", run(cli.main, argv, stop="_nothing_stops_a_plan"), fake_run, snapshot(fake_run))

    example()
