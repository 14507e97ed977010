"""Chat-format data: rows rendered with the tokenizer's chat template, the loss on assistant turns only,
and generation prompts rendered the same way. Expected texts are written out by hand in SmolLM2's
ChatML format, so a rendering or a mask that is off by a token fails."""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoTokenizer

from minitune.config import DataArgs, GenerationArgs, ModelArgs, QuantizationArgs, load_config
from minitune.data import generation_prompt, stop_token_ids, tokenize, user_prompt
from minitune.errors import DataError
from minitune.evaluate import generate
from minitune.evaluate.scoring import cut_at
from minitune.lm import IGNORE as IGNORE_INDEX
from minitune.metrics import task_scores
from minitune.model import load_model
from minitune.run import train

from .conftest import GPT2, REPO, tiny_config

SMOL = str(REPO / "data/tokenizers/smollm2-135m-instruct")
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
ROW = {"quote": "Be yourself; everyone else is taken.", "tags": ["be-yourself", "inspirational"]}


@pytest.fixture(scope="module")
def smol():
    return AutoTokenizer.from_pretrained(SMOL)


def _one(tok, rows, **data):
    args = DataArgs(path="x", chat_template=True, **{"max_length": 256, **data})
    ex = tokenize(datasets.Dataset.from_list(rows), args, tok, seq2seq=False)
    return ex[0]["input_ids"], ex[0]["labels"]


def _targets(tok, ids, labels) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    runs, run = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


def test_prompt_response_row_as_user_and_assistant_turns(smol):
    ids, labels = _one(smol, [ROW], prompt="Tags for: {quote}", response="{tags}")
    assert smol.decode(ids) == (SMOL_SYSTEM + "<|im_start|>user\nTags for: Be yourself; everyone else is taken."
                                "<|im_end|>\n<|im_start|>assistant\nbe-yourself, inspirational<|im_end|>\n")
    # the loss is on the answer and its end of turn, nothing else
    assert _targets(smol, ids, labels) == ["be-yourself, inspirational<|im_end|>\n"]


def test_system_prompt_replaces_the_templates_default(smol):
    ids, labels = _one(smol, [ROW], prompt="{quote}", response="{tags}", system_prompt="You tag quotes.")
    assert smol.decode(ids).startswith("<|im_start|>system\nYou tag quotes.<|im_end|>\n<|im_start|>user\nBe yourself")
    assert _targets(smol, ids, labels) == ["be-yourself, inspirational<|im_end|>\n"]


def test_messages_rows_every_assistant_turn_is_a_target(smol):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    ids, labels = _one(smol, [{"messages": turns, "other": 1}])
    assert smol.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                                "<|im_start|>assistant\n4<|im_end|>\n")
    assert _targets(smol, ids, labels) == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]
    # assistant_only_loss=false: every token is a target
    ids2, labels2 = _one(smol, [{"messages": turns}], assistant_only_loss=False)
    assert ids2 == ids and labels2 == ids


def test_generation_prompt_is_the_training_text_up_to_the_answer(smol):
    """Eval renders what training rendered: the prompt is the exact prefix before the first target."""
    args = DataArgs(path="x", chat_template=True, prompt="Tags for: {quote}", response="{tags}", system_prompt="S.")
    ids, labels = _one(smol, [ROW], prompt=args.prompt, response=args.response, system_prompt="S.")
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    text, shown, reference = generation_prompt(ROW, args, smol)
    assert smol(text, add_special_tokens=False)["input_ids"] == ids[:first]
    assert text.endswith("<|im_start|>assistant\n")
    assert shown == "Tags for: Be yourself; everyone else is taken."
    assert reference == "be-yourself, inspirational"
    # a free-text prompt (eval.py --prompts) is a user turn with the same system turn
    assert user_prompt("Tags for: Be yourself; everyone else is taken.", args, smol) == text
    # without a chat template the text is the prompt template's
    plain = DataArgs(path="x", prompt="{quote} ->: ", response="{tags}")
    assert generation_prompt(ROW, plain, smol) == ("Be yourself; everyone else is taken. ->: ",) * 2 + (
        "be-yourself, inspirational",)
    assert user_prompt("abc", plain, smol) == "abc"


def test_cut_examples_keep_what_is_left_of_the_answer_or_are_dropped(smol):
    args = DataArgs(path="x", chat_template=True, prompt="{quote}", response="{tags}")
    full, _ = _one(smol, [ROW], prompt="{quote}", response="{tags}")
    n_prompt = len(smol(generation_prompt(ROW, args, smol)[0], add_special_tokens=False)["input_ids"])
    short = {"quote": "x", "tags": ["a"]}  # fits any of the limits below
    rows = datasets.Dataset.from_list([ROW, short])
    args.max_length = n_prompt + 2  # two answer tokens survive the cut
    out = tokenize(rows, args, smol, seq2seq=False)
    assert out[0]["input_ids"] == full[: n_prompt + 2]
    assert sum(label != IGNORE_INDEX for label in out[0]["labels"]) == 2
    stats: dict = {}
    args.max_length = n_prompt - 1  # the answer is cut away: nothing to learn, dropped
    out = tokenize(rows, args, smol, seq2seq=False, stats=stats)
    assert len(out) == 1 and stats["no_target"] == 1 and stats["truncated"] == 1


def test_a_tokenizer_without_a_chat_template_is_refused():
    gpt2 = AutoTokenizer.from_pretrained(GPT2)
    with pytest.raises(DataError, match="has no chat template: use a tokenizer that has one"):
        _one(gpt2, [ROW], prompt="{quote}", response="{tags}")


@pytest.mark.parametrize("cell, match", [
    ("not a list", "column 'messages' must hold a non-empty list"),
    ([{"role": "narrator", "content": "x"}], "each turn needs a role"),
    ([{"role": "user", "content": 3}], "each turn needs a role"),
])
def test_malformed_messages_are_one_error(smol, cell, match):
    with pytest.raises(DataError, match=match):
        _one(smol, [{"messages": cell}])


def test_a_template_that_refuses_the_turns_names_them(smol):
    strict = AutoTokenizer.from_pretrained(SMOL)
    strict.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    turns = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(DataError, match=r"cannot render a conversation \(assistant -> user\).*roles must alternate"):
        _one(strict, [{"messages": turns}])


def test_refused_combinations():
    with pytest.raises(DataError, match="data.chat_template is for causal LMs"):
        tokenize(datasets.Dataset.from_list([ROW]), DataArgs(path="x", chat_template=True, prompt="{quote}"),
                 AutoTokenizer.from_pretrained(SMOL), seq2seq=True)
    # packing keeps each conversation a segment with its labels (tests/test_data.py): no longer refused
    load_config(tiny_config(data={"chat_template": True, "packing": True}))


def test_stop_tokens_include_the_end_of_turn(smol):
    assert stop_token_ids(smol, chat=True) == [smol.eos_token_id]  # SmolLM2: <|im_end|> is the EOS
    tok = AutoTokenizer.from_pretrained(GPT2)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot|>{% endfor %}"
    eot = tok.convert_tokens_to_ids("<|eot|>")
    assert stop_token_ids(tok, chat=True) == [tok.eos_token_id, eot]
    assert stop_token_ids(tok, chat=False) == [tok.eos_token_id]


def test_cut_at_the_first_stop_string():
    assert cut_at("a, b\n\nc", ["\n\n", ","]) == "a"
    assert cut_at("abc", ["x"]) == "abc"
    assert cut_at("abc", []) == "abc"


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(ModelArgs(preset="tiny-llama"), QuantizationArgs(), seed=0)


def test_generate_passes_the_decoding_controls(smol, tiny_model, monkeypatch):
    seen = {}
    original = tiny_model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        seen.update(kwargs, out=out)
        return out

    monkeypatch.setattr(tiny_model, "generate", spy)
    gen = GenerationArgs(max_new_tokens=24, repetition_penalty=1.3, no_repeat_ngram_size=2, stop=["zz"])
    prompt = generation_prompt(ROW, DataArgs(path="x", chat_template=True, prompt="{quote}", response="{tags}"), smol)[0]
    generate(tiny_model, smol, [prompt], gen, chat=True)
    assert seen["repetition_penalty"] == 1.3 and seen["no_repeat_ngram_size"] == 2
    assert seen["eos_token_id"] == [smol.eos_token_id] and seen["stopping_criteria"][0].stop == ["zz"]
    # the chat prompt was encoded as written: no second set of special tokens
    assert seen["input_ids"][0].tolist() == smol(prompt, add_special_tokens=False)["input_ids"]
    new = seen["out"][0, seen["input_ids"].shape[1]:].tolist()
    bigrams = list(zip(new, new[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))  # no_repeat_ngram_size=2 held


def test_generate_cuts_before_a_stop_string(tiny_model):
    """The generation stops at, and is cut before, a stop string in the new text: the stop is two
    characters the random model writes after its first two, where they first appear."""
    tok = AutoTokenizer.from_pretrained(GPT2)
    prompt = "The quote"  # the random model echoes its prompt's last word: a word of 4 letters or more
    free = generate(tiny_model, tok, [prompt], GenerationArgs(max_new_tokens=12, no_repeat_ngram_size=0))[0]
    at = next((i for i in range(2, len(free) - 1) if " " not in free[i:i + 2] and free.find(free[i:i + 2]) == i), None)
    assert at is not None, f"no two new characters after the first two in {free!r}: choose another prompt"
    stop = free[at:at + 2]
    cut = generate(tiny_model, tok, [prompt], GenerationArgs(max_new_tokens=12, no_repeat_ngram_size=0, stop=[stop]))
    assert cut[0] == free[:at].strip() and len(cut[0]) < len(free)


def test_a_chat_run_trains_and_evaluates_with_the_same_rendering(tmp_path):
    from minitune.evaluate import evaluate_checkpoint

    cfg = tiny_config("tiny-llama", tmp_path / "run", model={"tokenizer": SMOL},
                      data={"chat_template": True, "prompt": "Tags for: {quote}", "system_prompt": "Tag it.",
                            "max_length": 64, "validation_fraction": 0.012},
                      training={"eval_batches": 0})  # the whole held-out split, as eval.py measures
    result = train(cfg)
    ev = evaluate_checkpoint(result.checkpoint, ["generation.max_new_tokens=4"], out_dir=tmp_path / "ev", num_prompts=2)
    # the held-out loss eval measures is the one training measured: the same rendering and mask
    assert ev.perplexity["tuned"]["nll"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5)
    assert all(g["prompt"].startswith("Tags for: ") for g in ev.generations)  # the user turn, as a person reads it
    assert ev.generation["chat_template"] is True
    # task metrics of both sides' generations against the references: tags, scored as metrics.py scores them
    refs = [g["reference"] for g in ev.generations]
    for side in ("base", "tuned"):
        assert ev.task[side] == task_scores([g[side] for g in ev.generations], refs, "tags")
    assert "tag F1 (macro) (2 generations)" in (tmp_path / "ev" / "eval.md").read_text()


def test_no_assistant_turn_anywhere_names_the_chat_fix(smol):
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(DataError, match="no example keeps an assistant token .* data.assistant_only_loss=false"):
        _one(smol, rows)
    ids, labels = _one(smol, rows, assistant_only_loss=False)  # the whole conversation is the target
    assert labels == ids
