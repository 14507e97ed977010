"""Tokenization: rows -> input ids and labels (prompt masking, truncation, chat turns, packing),
cached by a fingerprint of the rows, the settings and the tokenizer, with statistics of what was cut."""

from __future__ import annotations

import hashlib
import logging
import statistics
from dataclasses import asdict
from typing import Any

import datasets

from ..config import DataArgs
from ..errors import DataError
from ..lm import IGNORE, shift_targets
from .chat import MESSAGES, chat_example, check_chat_template, common_prefix, conversation
from .sources import rows_of
from .templates import missing_column, render, template_columns

logger = logging.getLogger("minitune.data")


def _encode(tokenizer: Any, texts: list[str], max_len: int) -> tuple[list[list[int]], list[int]]:
    """Token ids with the tokenizer's special tokens, cut to `max_len` the tokenizer's way (T5
    keeps its closing </s>); and for each text its length before the cut (0 when not cut)."""
    ids = tokenizer(texts, verbose=False)["input_ids"]
    before = [len(x) if len(x) > max_len else 0 for x in ids]
    long = [i for i, n in enumerate(before) if n]
    if long:  # only the long ones are encoded twice
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_len, verbose=False)["input_ids"]
        for i, c in zip(long, cut, strict=True):
            ids[i] = c
    return ids, before


def _fingerprint(rows: datasets.Dataset, args: DataArgs, tokenizer: Any, seq2seq: bool, stage: str) -> str:
    # Passing our own fingerprint spares datasets from pickling and hashing the tokenizer.
    key = repr((rows._fingerprint, sorted(asdict(args).items()), getattr(tokenizer, "name_or_path", ""),
                type(tokenizer).__name__, len(tokenizer), seq2seq, stage))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _features(packed: bool = False) -> datasets.Features:
    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, **({"position_ids": ids} if packed else {}),
                              "length": datasets.Value("int32")})


def _count_targets(labels: list[int], seq2seq: bool) -> int:
    return sum(t != IGNORE for t in shift_targets(labels, "seq2seq" if seq2seq else "causal"))


def tokenize(
    rows: datasets.Dataset,
    args: DataArgs,
    tokenizer: Any,
    *,
    seq2seq: bool,
    stats: dict[str, int] | None = None,
) -> datasets.Dataset:
    """Render the templates over `rows` and turn them into ``input_ids`` / ``labels`` / ``length``.

    Causal: the text is prompt + response (+ EOS with ``data.add_eos``), cut to ``data.max_length``
    (a cut example loses its EOS: it did not end there; plain text, without a response template, is
    cut even when every document is longer: the warning counts the tokens cut and suggests packing); labels copy the ids, with the prompt's
    tokens set to -100 under ``data.mask_prompt``. The prompt's tokens are the longest common
    prefix of the prompt's and the full text's ids, so a token that a BPE tokenizer merges across
    the boundary (GPT-2 merges the space of "->: " into " love") stays a target. Examples whose
    response was cut away entirely are dropped.
    Seq2seq: ``input_ids`` encode the prompt (cut to ``max_length``), ``labels`` the response (cut
    to ``max_target_length``, ending with EOS as the tokenizer adds it, or as appended with
    ``data.add_eos`` when it does not).
    Packing (causal): every example, each ending with EOS, is concatenated and cut into blocks of
    exactly ``max_length`` tokens; the remainder is a last, shorter block; labels = ids.

    Empty examples (blank text) are dropped. ``length`` holds ``len(input_ids)`` (the source
    length for seq2seq), for grouping by length. The result is the same on every call.

    Args:
        rows: raw rows from :func:`load_rows`.
        args: the data section of the config.
        tokenizer: a Hugging Face tokenizer.
        seq2seq: encoder-decoder model (T5) rather than a causal LM.
        stats: if given, filled with ``rows_in``, ``rows``, ``empty``, ``no_target``,
            ``truncated``, ``tokens`` and ``target_tokens`` (the targets the loss sees).

    Returns:
        The tokenized dataset, with columns ``input_ids``, ``labels``, ``length``.

    Raises:
        DataError: a template names a missing column, every example is empty, every example with a
            response (or every seq2seq example) is longer than ``data.max_length`` /
            ``data.max_target_length``, or no example keeps a target token.
    """
    columns = rows.column_names
    chat_rows = args.chat_template and MESSAGES in columns  # the templates are not used
    for name, template in (("data.prompt", args.prompt), ("data.response", args.response)):
        for column in [] if chat_rows else template_columns(template, name):
            if column not in columns:
                raise missing_column(name, column, columns)
    if seq2seq and args.packing:
        raise DataError("data.packing is for causal LMs: set data.packing=false for a seq2seq model")
    if seq2seq and args.chat_template:
        raise DataError("data.chat_template is for causal LMs: set data.chat_template=false for a seq2seq model "
                        "and write the format with data.prompt / data.response")
    if args.chat_template:
        check_chat_template(tokenizer)
    if args.packing and tokenizer.eos_token_id is None:
        raise DataError("data.packing needs an EOS token between examples, and the tokenizer has none")
    count = {"rows_in": len(rows), "rows": 0, "empty": 0, "no_target": 0, "truncated": 0,
             "tokens": 0, "target_tokens": 0}
    cut_lengths: dict[str, list[int]] = {"source": [], "target": []}  # before the cut, for the error
    # keep_in_memory and no cache: the function always runs (so the counts are right) and no stale
    # cache file can outlive a change of tokenizer.
    out = rows.map(
        _seq2seq_batch if seq2seq else _causal_batch,
        fn_kwargs={"args": args, "tokenizer": tokenizer, "count": count, "cut_lengths": cut_lengths},
        batched=True,
        remove_columns=columns,
        features=_features(),
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=_fingerprint(rows, args, tokenizer, seq2seq, "tokenize"),
        desc="tokenize",
    )
    _check_counts(count, cut_lengths, args, len(out), seq2seq)
    if args.packing:
        out = pack(out, args.max_length)
    count["rows"] = len(out)
    count["tokens"] = sum(out["length"])
    count["target_tokens"] = sum(_count_targets(labels, seq2seq) for labels in out["labels"])
    if stats is not None:
        stats.update(count)
    return out


def _causal_batch(batch: dict[str, list], args: DataArgs, tokenizer: Any, count: dict[str, int],
                  cut_lengths: dict[str, list[int]]) -> dict[str, list]:
    """Causal examples for one batch of rows (see :func:`tokenize`); updates the counts."""
    if args.chat_template:
        return _chat_batch(batch, args, tokenizer, count, cut_lengths)
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    prompts, fulls = [], []
    for row in rows_of(batch):
        prompt = render(args.prompt, row, name="data.prompt")
        full = prompt + render(args.response, row, name="data.response")
        if not full.strip():
            count["empty"] += 1
            continue
        prompts.append(prompt)
        fulls.append(full)
    if not fulls:
        return out
    eos = tokenizer.eos_token_id
    limit = None if args.packing else args.max_length  # packing cuts long examples into pieces, not away
    full_ids = tokenizer(fulls, verbose=False)["input_ids"]
    prompt_ids = tokenizer(prompts, verbose=False)["input_ids"] if args.mask_prompt else None
    for i, ids in enumerate(full_ids):
        ids = list(ids)
        if (args.add_eos or args.packing) and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        ids, labels = _cut(ids, list(ids), limit, count, cut_lengths)
        if prompt_ids is not None:  # masked: the response may have been cut away
            n = common_prefix(prompt_ids[i], ids)
            labels[:n] = [IGNORE] * n
        _keep(out, ids, labels, count, need_target=prompt_ids is not None)
    return out


def _chat_batch(batch: dict[str, list], args: DataArgs, tokenizer: Any, count: dict[str, int],
                cut_lengths: dict[str, list[int]]) -> dict[str, list]:
    """Causal examples rendered with the chat template (see :func:`tokenize`); updates the counts."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for row in rows_of(batch):
        turns = conversation(row, args)
        if not any(t["content"].strip() for t in turns):
            count["empty"] += 1
            continue
        ids, labels = chat_example(tokenizer, turns, args.assistant_only_loss)
        ids, labels = _cut(ids, labels, None if args.packing else args.max_length, count, cut_lengths)
        _keep(out, ids, labels, count, need_target=True)  # no assistant turn, or it was cut away
    return out


def _cut(ids: list[int], labels: list[int], limit: int | None, count: dict[str, int],
         cut_lengths: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """A causal example cut to `limit` tokens (None: as it is), counted as truncated if it was cut."""
    if limit is None or len(ids) <= limit:
        return ids, labels
    count["truncated"] += 1
    cut_lengths["source"].append(len(ids))
    return ids[:limit], labels[:limit]


def _keep(out: dict[str, list], ids: list[int], labels: list[int], count: dict[str, int], *,
          need_target: bool) -> None:
    """Add a causal example to `out`, unless `need_target` and no label is left to learn from."""
    if need_target and all(t == IGNORE for t in shift_targets(labels, "causal")):
        count["no_target"] += 1
        return
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["length"].append(len(ids))


def _seq2seq_batch(batch: dict[str, list], args: DataArgs, tokenizer: Any, count: dict[str, int],
                   cut_lengths: dict[str, list[int]]) -> dict[str, list]:
    """Seq2seq examples for one batch of rows (see :func:`tokenize`); updates the counts."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    sources, targets = [], []
    for row in rows_of(batch):
        source = render(args.prompt, row, name="data.prompt")
        target = render(args.response, row, name="data.response")
        if not source.strip() or not target.strip():
            count["empty"] += 1
            continue
        sources.append(source)
        targets.append(target)
    if not sources:
        return out
    eos = tokenizer.eos_token_id
    source_ids, source_cut = _encode(tokenizer, sources, args.max_length)
    target_ids, target_cut = _encode(tokenizer, targets, args.max_target_length)
    for ids, labels, cut_s, cut_t in zip(source_ids, target_ids, source_cut, target_cut, strict=True):
        labels = list(labels)
        if args.add_eos and eos is not None and (not labels or labels[-1] != eos):
            labels = labels[: args.max_target_length - 1] + [eos]  # a tokenizer that adds no EOS
        count["truncated"] += bool(cut_s or cut_t)
        if cut_s:
            cut_lengths["source"].append(cut_s)
        if cut_t:
            cut_lengths["target"].append(cut_t)
        out["input_ids"].append(list(ids))
        out["labels"].append(labels)
        out["length"].append(len(ids))
    return out


def _check_counts(count: dict[str, int], cut_lengths: dict[str, list[int]], args: DataArgs, kept_rows: int,
                  seq2seq: bool) -> None:
    """Raise when nothing usable is left; warn about truncated and dropped examples."""
    kept = count["rows_in"] - count["empty"]
    if kept == 0:
        raise DataError(f"every one of the {count['rows_in']} examples is empty: check that data.prompt "
                        f"('{args.prompt}') and data.response ('{args.response}') name columns with text")
    # plain text (a causal LM, no response template): long documents are cut to data.max_length, never refused
    plain_text = not seq2seq and not args.response
    for part, knob in (("source", "max_length"), ("target", "max_target_length")):
        cut = cut_lengths[part]
        if len(cut) == kept and not plain_text:
            median = int(statistics.median(cut))
            raise DataError(f"every example is longer than data.{knob}={getattr(args, knob)} tokens (shortest "
                            f"{min(cut)}, median {median}): raise data.{knob} (e.g. to {median})")
    if kept_rows == 0:
        if args.chat_template:
            raise DataError(f"no example keeps an assistant token within data.max_length={args.max_length} (the "
                            "loss is on assistant turns only): raise data.max_length, give rows an assistant turn, "
                            "or set data.assistant_only_loss=false")
        raise DataError(f"no example keeps a response token within data.max_length={args.max_length} "
                        "(data.mask_prompt hides the prompt): raise data.max_length or shorten the prompt")
    if count["truncated"]:
        limits = f"data.max_length={args.max_length}"
        if seq2seq:
            limits += f" or data.max_target_length={args.max_target_length}"
        lost = (sum(cut_lengths["source"]) - len(cut_lengths["source"]) * args.max_length
                + sum(cut_lengths["target"]) - len(cut_lengths["target"]) * args.max_target_length)
        hint = "; to train on whole documents, set data.packing=true" if plain_text else ""
        logger.warning("%d of %d examples were longer than %s tokens and were truncated (%d tokens cut)%s",
                       count["truncated"], kept, limits, lost, hint)
    if count["empty"] or count["no_target"]:
        logger.warning("dropped %d empty examples and %d whose response was cut away by data.max_length",
                       count["empty"], count["no_target"])


def pack(ds: datasets.Dataset, block: int) -> datasets.Dataset:
    """Pack the examples, in order, into rows of at most `block` tokens, each example a segment of its own.

    A segment keeps its labels (a masked prompt, the turns outside the loss) and gets its own positions
    (0, 1, ...): from position ids that restart, transformers builds a block-diagonal causal mask, so a
    token attends within its own example only, and the first label of each segment is -100, so no
    example predicts the next one's first token. Each example then has exactly the loss it has alone
    (`tests/test_data.py`). An example goes into the current row if it fits, else it starts the next
    row; one longer than `block` is cut into `block`-token pieces, each a segment. Every token is kept.
    """
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
    ids_row: list[int] = []
    labels_row: list[int] = []
    positions: list[int] = []

    def close_row() -> None:
        if ids_row:
            rows["input_ids"].append(ids_row[:])
            rows["labels"].append(labels_row[:])
            rows["position_ids"].append(positions[:])
            rows["length"].append(len(ids_row))
            ids_row.clear(), labels_row.clear(), positions.clear()

    for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True):
        for start in range(0, len(ids), block):
            piece = ids[start: start + block]
            if len(ids_row) + len(piece) > block:
                close_row()
            ids_row.extend(piece)
            labels_row.extend([IGNORE, *labels[start + 1: start + len(piece)]])
            positions.extend(range(len(piece)))
    close_row()
    return datasets.Dataset.from_dict(rows, features=_features(packed=True))
