"""Chat: conversational rows rendered with the tokenizer's chat template, and the prompts and stop
tokens of generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import DataArgs
from ..errors import DataError
from ..lm import IGNORE
from .templates import render

MESSAGES = "messages"  # the column of conversational rows (TRL's name): [{"role": ..., "content": ...}, ...]


ROLES = ("system", "user", "assistant", "tool")


def check_chat_template(tokenizer: Any) -> None:
    """Raise a DataError when `tokenizer` has no chat template (data.chat_template=true needs one)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"data.chat_template=true, but the tokenizer '{name}' has no chat template: use a tokenizer "
                        "that has one (an -Instruct / -chat model's), or set data.chat_template=false and write the "
                        "format with data.prompt / data.response")


def _checked_messages(value: Any) -> list[dict[str, str]]:
    """A `messages` cell as a list of {"role", "content"} turns with text content."""
    if not isinstance(value, list) or not value:
        raise DataError(f"column '{MESSAGES}' must hold a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        f"turns, got {str(value)[:80]!r}")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(f"column '{MESSAGES}': each turn needs a role ({', '.join(ROLES)}) and a text content, "
                            f"got {str(turn)[:80]!r}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def conversation(row: dict[str, Any], args: DataArgs) -> list[dict[str, str]]:
    """The row as chat turns: its `messages` column if it has one, else data.system_prompt (if set) as
    the system turn, data.prompt as the user turn and data.response (if set) as the assistant turn.

    Raises:
        DataError: a malformed `messages` cell, or a template over a missing column.
    """
    if MESSAGES in row:
        return _checked_messages(row[MESSAGES])
    turns = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    turns.append({"role": "user", "content": render(args.prompt, row, name="data.prompt")})
    if args.response:
        turns.append({"role": "assistant", "content": render(args.response, row, name="data.response")})
    return turns


def apply_chat(tokenizer: Any, turns: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    """The text of `turns` as the tokenizer's chat template writes it (special tokens included:
    encode it with ``add_special_tokens=False``).

    Raises:
        DataError: the template refuses the turns (e.g. roles that do not alternate).
    """
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError, or the template's own raise_exception(...)
        roles = " -> ".join(t["role"] for t in turns) or "no turns"
        raise DataError(f"the tokenizer's chat template cannot render a conversation ({roles}): "
                        f"{type(e).__name__}: {e}; check the order of the roles in the data") from None


def chat_example(tokenizer: Any, turns: list[dict[str, str]], assistant_only: bool) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation; with `assistant_only`, labels are -100 outside the
    assistant turns. An assistant turn's tokens are those between the conversation rendered up to
    the turn with the generation prompt and rendered through the turn (its end-of-turn token
    included), each matched against the whole conversation's ids as a common prefix."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    full = ids(apply_chat(tokenizer, turns))
    if not assistant_only:
        return full, list(full)
    labels = [IGNORE] * len(full)
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            start = common_prefix(ids(apply_chat(tokenizer, turns[:i], generation_prompt=True)), full)
            end = common_prefix(ids(apply_chat(tokenizer, turns[: i + 1])), full)
            labels[start:end] = full[start:end]
    return full, labels


def generation_prompt(row: dict[str, Any], args: DataArgs, tokenizer: Any) -> tuple[str, str, str]:
    """What a model is asked to continue for one row, rendered as training renders it.

    Returns:
        (text to encode, the prompt as a person reads it, the reference response or ""). With
        data.chat_template: the turns before the last assistant turn, with the template's
        generation prompt (encode it with ``add_special_tokens=False``); shown is the last user turn.
    """
    if not args.chat_template:
        prompt = render(args.prompt, row, name="data.prompt")
        return prompt, prompt, render(args.response, row, name="data.response") if args.response else ""
    turns = conversation(row, args)
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=len(turns))
    context = turns[:last]
    shown = next((t["content"] for t in reversed(context) if t["role"] == "user"), "")
    reference = turns[last]["content"] if last < len(turns) else ""
    return apply_chat(tokenizer, context, generation_prompt=True), shown, reference


def user_prompt(text: str, args: DataArgs, tokenizer: Any) -> str:
    """A free-text prompt (eval.py --prompts) as training renders a user turn: with data.chat_template,
    data.system_prompt (if set) and `text` as the user turn, with the generation prompt; else `text`."""
    if not args.chat_template:
        return text
    turns = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    return apply_chat(tokenizer, [*turns, {"role": "user", "content": text}], generation_prompt=True)


def stop_token_ids(tokenizer: Any, chat: bool) -> list[int]:
    """Token ids that end a generation: EOS, and for `chat` prompts the special token that ends an
    assistant turn (found by rendering one; SmolLM2's <|im_end|> is its EOS, Llama 3's <|eot_id|> is not)."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat:
        marker = "\u2063minitune\u2063"
        text = apply_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        after = text.split(marker, 1)[-1].lstrip()
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        first = tokenizer(after, add_special_tokens=False, verbose=False)["input_ids"][:1]
        if first and first[0] in special and first[0] not in stop:
            stop.append(first[0])
    return stop


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
