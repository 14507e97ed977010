"""minitune.data: rows, templates, tokenization (causal, seq2seq, packing), batches and samplers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from minitune.config import DataArgs  # noqa: E402
from minitune.data import (
    Collator,
    LengthGroupedSampler,
    build_data,
    estimate_padding,
    load_rows,
    make_dataloader,
    pack,
    render,
    repair_text,
    tokenize,
)
from minitune.errors import DataError
from minitune.lm import ensure_pad_token

ROOT = Path(__file__).resolve().parents[1]
QUOTES = ROOT / "data" / "english_quotes.jsonl"
XSUM = ROOT / "tests" / "fixtures" / "xsum_sample.json"
TOKENIZERS = ROOT / "tests" / "fixtures" / "tokenizers"
SMOLLM = ROOT / "data" / "tokenizers" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gpt2():
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    assert tok.pad_token is None  # ensure_pad_token has something to do
    return tok


@pytest.fixture(scope="module")
def t5():
    pytest.importorskip("sentencepiece", reason="T5Tokenizer reads spiece.model through sentencepiece")
    return AutoTokenizer.from_pretrained(TOKENIZERS / "t5_test_sentencepiece")


def quotes(**kw) -> DataArgs:
    base = {"path": str(QUOTES), "prompt": "{quote} ->: ", "response": "{tags}", "validation_fraction": 0.0,
            "max_samples": 200, "max_length": 128}
    return DataArgs(**{**base, **kw})


def xsum(**kw) -> DataArgs:
    base = {"path": str(XSUM), "prompt": "summarize: {document}", "response": "{summary}",
            "validation_fraction": 0.0, "max_length": 1024, "max_target_length": 128}
    return DataArgs(**{**base, **kw})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ templates


def test_render_joins_list_columns_and_blanks_none():
    row = {"quote": "“Be yourself.”", "author": None, "tags": ["be-yourself", "honesty"]}
    assert render("{quote} ->: ", row) == "“Be yourself.” ->: "
    assert render("{tags}", row) == "be-yourself, honesty"
    assert render("by {author}.", row) == "by ."


def test_missing_column_error_lists_the_columns(gpt2):
    with pytest.raises(DataError) as e:
        render("{text}", {"quote": "q", "author": "a", "tags": []}, name="data.prompt")
    assert str(e.value) == ("data.prompt uses column 'text' but the data has columns: quote, author, tags; "
                            "set data.prompt / data.response to a template over them")
    rows, _ = load_rows(quotes(max_samples=5))
    with pytest.raises(DataError, match=r"data.response uses column 'tag' .* quote, author, tags"):
        tokenize(rows, quotes(response="{tag}"), gpt2, seq2seq=False)
    with pytest.raises(DataError, match="not a valid template"):
        tokenize(rows, quotes(prompt="{quote"), gpt2, seq2seq=False)


# ------------------------------------------------------------------------------------ rows


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"data file '{missing}' does not exist"):
        load_rows(DataArgs(path=str(missing)))


def test_hub_id_offline_asks_for_a_local_file():
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1")
    with pytest.raises(DataError, match="dataset 'someone/no-such-dataset' is not available offline.*local file"):
        load_rows(DataArgs(path="someone/no-such-dataset"))


def test_empty_file_and_empty_after_max_samples(tmp_path, gpt2):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_rows(DataArgs(path=str(empty)))
    with pytest.raises(DataError, match="no training rows"):
        load_rows(quotes(max_samples=0))
    # the first rows are blank lines: max_samples keeps only them, and tokenize has nothing left
    text = tmp_path / "notes.txt"
    text.write_text("\n \n\nsome text\n")
    args = DataArgs(path=str(text), validation_fraction=0.0, max_samples=3)
    rows, _ = load_rows(args)
    assert len(rows) == 3
    with pytest.raises(DataError, match="every one of the 3 examples is empty"):
        tokenize(rows, args, gpt2, seq2seq=False)


def test_json_lines_json_list_csv_txt_and_folders_load(tmp_path):
    rows = [{"document": "a b", "summary": "a"}, {"document": "c d", "summary": "c"}]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows))
    csv = tmp_path / "pairs.csv"
    csv.write_text("document,summary\na b,a\nc d,c\n")
    txt = tmp_path / "lines.txt"
    txt.write_text("first line\nsecond line\n")
    assert len(load_rows(xsum())[0]) == 10  # xsum_sample.json is JSON lines under a .json name
    for path in (as_list, csv):
        train, _ = load_rows(xsum(path=str(path)))
        assert train.column_names == ["document", "summary"] and train[1] == rows[1]
    train, _ = load_rows(DataArgs(path=str(txt), validation_fraction=0.0))
    assert list(train["text"]) == ["first line", "second line"]

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"row {i}"} for i in range(5)])
    write_jsonl(folder / "validation.jsonl", [{"text": "held out"}])
    train, validation = load_rows(DataArgs(path=str(folder), validation_split="validation"))
    assert len(train) == 5 and list(validation["text"]) == ["held out"]
    with pytest.raises(DataError, match="validation split 'dev' .* splits found: train, validation"):
        load_rows(DataArgs(path=str(folder), validation_split="dev"))


def test_validation_hold_out_is_fixed_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"id": i, "text": f"row {i}"} for i in range(100)])
    args = DataArgs(path=str(path), validation_fraction=0.2)
    train, validation = load_rows(args)
    train2, validation2 = load_rows(DataArgs(path=str(path), validation_fraction=0.2, max_samples=30))
    assert len(validation) == 20 and len(train) == 80
    assert not set(train["id"]) & set(validation["id"])
    assert sorted(list(train["id"]) + list(validation["id"])) == list(range(100))
    # the same held-out rows every time, and max_samples only caps the training rows
    assert list(validation2["id"]) == list(validation["id"])
    assert len(train2) == 30 and set(train2["id"]) <= set(train["id"])
    _, none = load_rows(DataArgs(path=str(path), validation_fraction=0.0))
    assert none is None


# mojibake: UTF-8 text read as Windows-1252, written with escapes so that this file shows which is which
DONT = "Don\u00e2\u20ac\u2122t walk in front of me\u00e2\u20ac\u00a6"  # Don’t walk in front of me…
BRONTE = "Emily Bront\u00c3\u00ab"  # Emily Brontë
CLICHES = "clich\u00c3\u00a9s"  # clichés


def test_repair_text_repairs_mojibake_and_leaves_right_text_alone():
    assert repair_text(DONT) == "Don\u2019t walk in front of me\u2026"
    assert repair_text(BRONTE) == "Emily Bront\u00eb" and repair_text(CLICHES) == "clich\u00e9s"
    assert repair_text("\u00d8\u00ad\u00d8\u00a8") == "\u062d\u0628"  # Arabic 'love', a tag of the shipped data
    right = ["\u201cBe yourself.\u201d \u2014 na\u00efve caf\u00e9, d\u00e9j\u00e0 vu\u2026", "Gabriel Garc\u00eda M\u00e1rquez",
             "Stra\u00dfe", "\u062d\u0628", "\u65e5\u672c\u8a9e", "S\u00e3o Paulo", "N\u00c3O", "\ufb01ne", "\uff21\uff22", "a &amp; b",
             "one\r\ntwo", "e\u0301"]  # curly quotes, accents, other scripts; ftfy's other fixes stay off
    assert [repair_text(t) for t in right] == right


def test_fix_text_repairs_every_string_of_train_and_validation_rows_when_asked(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [
        {"quote": DONT, "author": BRONTE, "tags": [CLICHES, "books"], "year": 1847, "turns": [{"who": "x"}]},
        {"quote": "\u201cBe yourself.\u201d", "author": "Oscar Wilde", "tags": ["honesty"], "year": 1890,
         "turns": [{"who": "user"}, {"who": BRONTE}]},  # a list of structs, as a chat `messages` column
    ])
    write_jsonl(folder / "validation.jsonl", [{"quote": "caf\u00c3\u00a9", "author": "x", "tags": [], "year": 1,
                                               "turns": []}])
    args = DataArgs(path=str(folder), validation_split="validation")
    with caplog.at_level(logging.INFO, logger="minitune.data"):
        train, validation = load_rows(args)
    assert train[0] == {"quote": DONT, "author": BRONTE, "tags": [CLICHES, "books"], "year": 1847,
                        "turns": [{"who": "x"}]}  # as read
    assert "fix_text" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="minitune.data"):
        fixed, fixed_validation = load_rows(DataArgs(path=str(folder), validation_split="validation", fix_text=True))
    assert fixed[0] == {"quote": "Don\u2019t walk in front of me\u2026", "author": "Emily Bront\u00eb",
                        "tags": ["clich\u00e9s", "books"], "year": 1847, "turns": [{"who": "x"}]}
    assert fixed[1] == {**train[1], "turns": [{"who": "user"}, {"who": "Emily Bront\u00eb"}]}
    assert fixed_validation[0]["quote"] == "caf\u00e9"
    assert fixed.features == train.features and fixed_validation.features == validation.features
    # strings seen: 5 + 5 in train (quote, author, each tag, each turn's `who`), 2 in validation;
    # changed: row 1's quote, author and a tag, row 2's second turn, the validation quote
    assert "data.fix_text: repaired 5 of 12 text values in the train and validation rows" in caplog.text


def test_fix_text_leaves_columns_without_text_as_read(tmp_path):
    # found by tests/test_fuzz.py: a struct of nulls under a NUL-named field cannot make the round
    # trip through Python back into Arrow; only the columns that hold text are repaired now
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"Don\u00e2\u20ac\u2122t {i}", "x": {"\u0000": None}, "n": i}) + "\n"
                            for i in range(3)))
    train, _ = load_rows(DataArgs(path=str(path), prompt="{text}", response="", fix_text=True,
                                  validation_fraction=0.0))
    assert train.column_names == ["text", "x", "n"]
    assert train["text"] == [f"Don\u2019t {i}" for i in range(3)] and train["n"] == [0, 1, 2]
    # the same field holding text: that column is left as read, with a warning; the rest repaired
    path.write_text("".join(json.dumps({"text": "Don\u00e2\u20ac\u2122t", "x": {"\u0000": "a"}}) + "\n" for _ in range(2)))
    train, _ = load_rows(DataArgs(path=str(path), prompt="{text}", response="", fix_text=True,
                                  validation_fraction=0.0))
    assert train["text"] == ["Don\u2019t"] * 2 and len(train["x"]) == 2


def test_shipped_quotes_are_repaired(caplog):
    """data/english_quotes.jsonl was repaired with data/fix_text.py (see data/SOURCES.md)."""
    text = QUOTES.read_text(encoding="utf-8")
    # traces of UTF-8 read as Windows-1252 ('â€™', 'Ã©', 'Â ', Arabic as 'Ø£Ù…') and of lost bytes
    for trace in ("\u00e2\u20ac", "\u00c3", "\u00c2", "\u00d8", "\u00d9", "\ufffd"):
        assert trace not in text, ascii(trace)
    with caplog.at_level(logging.INFO, logger="minitune.data"):
        load_rows(quotes(fix_text=True, max_samples=None))
    assert "data.fix_text: repaired 0 of 13024 text values" in caplog.text  # nothing left for ftfy


# ------------------------------------------------------------------------------------ tokenize + collate


def test_causal_labels_are_minus_100_exactly_on_padding(gpt2):
    bundle = build_data(quotes(max_samples=40), gpt2, seq2seq=False)
    assert gpt2.pad_token_id == gpt2.eos_token_id  # ensure_pad_token ran (GPT-2 has no pad token)
    batch = bundle.collator([bundle.train[i] for i in range(8)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in batch.values())
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"] == -100, ~mask)
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).any()  # there was padding
    # every example ends with EOS (data.add_eos), which stays a target although EOS is also the pad
    lengths = batch["attention_mask"].sum(1)
    assert all(batch["labels"][i, n - 1] == gpt2.eos_token_id for i, n in enumerate(lengths.tolist()))
    assert bundle.stats["rows"] == 40 and bundle.stats["tokens"] == sum(bundle.train["length"])


@pytest.mark.parametrize("tokenizer_path", [TOKENIZERS / "gpt2", SMOLLM])
def test_mask_prompt_hides_exactly_the_prompt(tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    args = quotes(max_samples=30, mask_prompt=True, max_length=1024)
    rows, _ = load_rows(args)
    ds = tokenize(rows, args, tok, seq2seq=False)
    assert len(ds) == 30
    for row, ex in zip(rows, ds, strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        n = labels.count(-100)
        assert labels[:n] == [-100] * n and labels[n:] == ids[n:]  # a masked prefix, then targets
        prompt, response = render(args.prompt, row), render(args.response, row)
        # GPT-2 merges the prompt's last space into the first response token, which stays a target
        assert tok.decode(ids[:n]).strip() == prompt.strip()
        assert tok.decode(ids[n:]).strip() == response + tok.eos_token


def test_mask_prompt_drops_examples_whose_response_was_cut_away(gpt2):
    args = quotes(max_samples=100, mask_prompt=True, max_length=40)
    rows, _ = load_rows(args)
    stats: dict = {}
    ds = tokenize(rows, args, gpt2, seq2seq=False, stats=stats)
    assert stats["no_target"] > 0 and len(ds) == 100 - stats["no_target"]
    assert all(any(t != -100 for t in labels[1:]) for labels in ds["labels"])
    assert stats["target_tokens"] == sum(sum(t != -100 for t in labels[1:]) for labels in ds["labels"])


def test_seq2seq_batches_from_xsum(gpt2):
    args = xsum(max_length=256, max_target_length=16)
    bundle = build_data(args, gpt2, seq2seq=True)
    assert bundle.stats["rows"] == 10 and bundle.stats["truncated"] > 0
    batch = next(iter(make_dataloader(bundle.train, bundle.collator, batch_size=4, shuffle=False, seed=0)))
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == 4
    assert batch["input_ids"].shape[1] <= 256 and batch["labels"].shape[1] <= 16
    for labels in batch["labels"]:
        targets = labels[labels != -100]
        assert targets[-1] == gpt2.eos_token_id  # add_eos: the decoder learns to stop


def test_seq2seq_t5_keeps_eos_when_truncating(t5):
    bundle = build_data(xsum(max_length=256, max_target_length=48), t5, seq2seq=True)
    assert 0 < bundle.stats["truncated"] < 10
    for ex in bundle.train:
        assert len(ex["input_ids"]) <= 256 and ex["input_ids"][-1] == t5.eos_token_id
        assert len(ex["labels"]) <= 48 and ex["labels"][-1] == t5.eos_token_id
    assert max(bundle.train["length"]) == 256
    batch = next(iter(make_dataloader(bundle.train, bundle.collator, batch_size=10, shuffle=False, seed=0)))
    assert batch["input_ids"].shape == (10, 256) and batch["labels"].shape == (10, 48)
    assert batch["attention_mask"].sum().item() == bundle.stats["tokens"]
    assert (batch["labels"] != -100).sum().item() == bundle.stats["target_tokens"]


def test_packing_keeps_each_example_a_segment_with_its_labels_and_positions(gpt2):
    args = quotes(max_samples=50, packing=True, max_length=256, mask_prompt=True)
    rows, _ = load_rows(args)
    packed = tokenize(rows, args, gpt2, seq2seq=False)
    alone = tokenize(rows, quotes(max_samples=50, max_length=10_000, mask_prompt=True), gpt2, seq2seq=False)
    assert len(packed) < len(alone) and all(0 < n <= 256 for n in packed["length"])
    # every token kept, in order; each example (or, past 256 tokens, each 256-token piece) a segment
    # whose positions restart at 0 and whose first label is -100; its other labels as alone
    assert [t for r in packed["input_ids"] for t in r] == [t for r in alone["input_ids"] for t in r]
    segments = [(ids[start: start + 256], labels[start: start + 256])
                for ids, labels in zip(alone["input_ids"], alone["labels"], strict=True) for start in range(0, len(ids), 256)]
    found = []
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"], strict=True):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        assert positions == [p for a, b in zip(starts, starts[1:], strict=False) for p in range(b - a)]
        found += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    assert [ids for ids, _ in found] == [ids for ids, _ in segments]
    assert [labels for _, labels in found] == [[-100, *labels[1:]] for _, labels in segments]
    assert any(-100 in labels[1:] for _, labels in found)  # the prompt masks are kept
    with pytest.raises(DataError, match="packing is for causal"):
        tokenize(rows, args, gpt2, seq2seq=True)


def _small(config_class: str, **kw):
    import transformers

    shape = dict(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return getattr(transformers, config_class)(**{**shape, **kw})


PACKING_CONFIGS = {  # one small config per model type minitune packs for (minitune.lm.PACKING_MODEL_TYPES)
    "llama": lambda: _small("LlamaConfig"), "mistral": lambda: _small("MistralConfig"),
    "qwen2": lambda: _small("Qwen2Config"), "qwen3": lambda: _small("Qwen3Config", head_dim=8),
    "gemma": lambda: _small("GemmaConfig", head_dim=8),
    "gpt_neo": lambda: _small("GPTNeoConfig", num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                              window_size=8),
}


@pytest.mark.parametrize("model_type", sorted(PACKING_CONFIGS))
def test_a_packed_batch_gives_each_example_the_loss_it_has_alone(model_type):
    from transformers import AutoModelForCausalLM

    from minitune.lm import PACKING_MODEL_TYPES
    from minitune.losses import model_inputs

    assert set(PACKING_CONFIGS) == PACKING_MODEL_TYPES
    config = PACKING_CONFIGS[model_type]()
    assert config.model_type == model_type
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in ((7, 3), (12, 5), (5, 0), (9, 4)):  # lengths, masked prompt tokens
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "length": n})
    packed = pack(datasets.Dataset.from_list(examples), 20)
    assert len(packed) == 2  # 7 + 12, then 5 + 9: two rows, each padded to 20 in the batch
    collator = Collator(AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2"), seq2seq=False)

    def token_losses(batch):
        logits = model(**model_inputs(batch), use_cache=False).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="none")
        return losses[targets != -100]

    with torch.no_grad():
        together = token_losses(collator.collate(list(packed)))
        apart = torch.cat([token_losses(collator.collate([e])) for e in examples])
    assert together.shape == apart.shape == ((7 - 3) + (12 - 5) + (5 - 1) + (9 - 4),)  # targets: after the prompt
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=0)


def test_packing_is_refused_for_a_model_whose_attention_would_mix_examples(gpt2):
    from minitune.build import setup_data
    from minitune.config import load_config

    from .conftest import tiny_config

    with pytest.raises(DataError, match="data.packing needs a model whose attention keeps packed examples apart; opt"):
        setup_data(load_config(tiny_config("tiny-opt", data={"packing": True})), gpt2)


def test_all_too_long_is_an_error_and_some_too_long_a_warning(gpt2, caplog):
    args = quotes(max_samples=20, max_length=4)
    rows, _ = load_rows(args)
    with pytest.raises(DataError, match=r"every example is longer than data.max_length=4 .*raise data.max_length"):
        tokenize(rows, args, gpt2, seq2seq=False)
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="minitune.data"):
        ds = tokenize(rows, quotes(max_samples=20, max_length=24), gpt2, seq2seq=False, stats=stats)
    assert 0 < stats["truncated"] < 20 and "were truncated" in caplog.text
    assert max(ds["length"]) == 24


def test_collator_pads_to_a_multiple(gpt2):
    collate = Collator(gpt2, seq2seq=True, pad_to_multiple_of=8)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [1]}, {"input_ids": [5], "labels": [1, 2, 3, 4, 5, 6, 7, 8, 9]}])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 4 and (batch["labels"] != -100).sum().item() == 10
    assert ensure_pad_token(gpt2) == gpt2.eos_token_id


@pytest.mark.parametrize("multiple", [8, 16])
def test_pad_to_multiple_of_bounds_the_batch_widths(gpt2, multiple):
    """data.pad_to_multiple_of reaches the run's collator: every batch width is a multiple, or
    data.max_length itself (never wider: the planner simulates that width), so a run sees at most
    max_length / multiple + 1 shapes (each new one costs RSS in the CPU kernels' caches)."""
    args = quotes(max_samples=300, max_length=60, pad_to_multiple_of=multiple)
    data = build_data(args, gpt2, seq2seq=False, batch_size=4)
    widths = [b["input_ids"].shape[1] for b in make_dataloader(data.train, data.collator, batch_size=4,
                                                                 shuffle=True, seed=0)]
    assert all(w % multiple == 0 or w == 60 for w in widths) and max(widths) <= 60
    assert len(set(widths)) <= 60 // multiple + 1
    plain = build_data(quotes(max_samples=300, max_length=60, pad_to_multiple_of=0), gpt2, seq2seq=False, batch_size=4)
    plain_widths = {b["input_ids"].shape[1] for b in make_dataloader(plain.train, plain.collator, batch_size=4,
                                                                       shuffle=True, seed=0)}
    assert len(plain_widths) > 60 // multiple + 1  # the data has more widths than that without it


# ------------------------------------------------------------------------------------ loaders


def _order(loader) -> list[int]:
    return [int(t) for batch in loader for t in batch["input_ids"][:, 0]]


def test_dataloader_order_is_seeded(gpt2):
    ds = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(1, 41)], "labels": [[i] for i in range(1, 41)]})
    collate = Collator(gpt2, seq2seq=False)

    def order(seed: int, epoch: int = 0) -> list[int]:
        loader = make_dataloader(ds, collate, batch_size=6, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return _order(loader)

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, epoch=1) != order(1) and order(1, epoch=1) == order(1, epoch=1)
    assert sorted(order(1)) == list(range(1, 41))  # nothing dropped: the last batch has 4
    loader = make_dataloader(ds, collate, batch_size=6, shuffle=True, seed=1)
    assert _order(loader) == order(1) and _order(loader) == order(1, epoch=1)  # epochs move on by themselves
    assert _order(make_dataloader(ds, collate, batch_size=6, shuffle=False, seed=1)) == list(range(1, 41))
    assert len(make_dataloader(ds, collate, batch_size=6, shuffle=True, seed=1, drop_last=True)) == 6


def test_group_by_length_cuts_padding_and_keeps_every_example(gpt2):
    args = quotes(max_samples=None, max_length=96)
    rows, _ = load_rows(args)
    ds = tokenize(rows.select(range(1000)), args, gpt2, seq2seq=False)
    collate = Collator(gpt2, seq2seq=False)

    def padding(group: bool) -> float:
        loader = make_dataloader(ds, collate, batch_size=8, shuffle=True, seed=0, group_by_length=group)
        real = total = 0
        for batch in loader:
            real += batch["attention_mask"].sum().item()
            total += batch["attention_mask"].numel()
        return 1 - real / total

    plain, grouped = padding(False), padding(True)
    assert grouped < plain / 3, (plain, grouped)
    assert grouped == pytest.approx(estimate_padding(ds["length"], 8, group_by_length=True), abs=1e-9)

    sampler = LengthGroupedSampler(ds["length"], batch_size=8, seed=0)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(len(ds)))  # every example exactly once
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(len(ds))) and epoch1 != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    # a short last batch (1003 = 125 * 8 + 3) is kept and comes last
    uneven = LengthGroupedSampler(list(range(1003)), batch_size=8, seed=3)
    assert sorted(uneven) == list(range(1003))
    lengths = [len(b) for b in torch.utils.data.BatchSampler(uneven, 8, drop_last=False)]
    assert lengths == [8] * 125 + [3]


def test_plain_text_longer_than_max_length_is_truncated_with_a_count(tmp_path, gpt2, caplog):
    docs = ["word " * n for n in (30, 50, 70)]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs))
    args = DataArgs(path=str(path), validation_fraction=0.0, max_length=8)  # prompt {text}, no response
    rows, _ = load_rows(args)
    stats: dict = {}
    with caplog.at_level(logging.WARNING, logger="minitune.data"):
        ds = tokenize(rows, args, gpt2, seq2seq=False, stats=stats)
    full = [len(gpt2(d)["input_ids"]) + 1 for d in docs]  # + EOS
    assert list(ds["length"]) == [8, 8, 8] and stats["truncated"] == 3
    assert ds["input_ids"][0] == gpt2(docs[0])["input_ids"][:8]
    assert (f"3 of 3 examples were longer than data.max_length=8 tokens and were truncated ({sum(full) - 24} tokens "
            "cut); to train on whole documents, set data.packing=true") in caplog.text
    # a response template keeps the refusal: a cut response would teach the model to stop mid-answer
    with pytest.raises(DataError, match="every example is longer than data.max_length=8"):
        tokenize(rows, DataArgs(path=str(path), response="{text}", validation_fraction=0.0, max_length=8), gpt2,
                 seq2seq=False)
