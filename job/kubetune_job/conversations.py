"""LLM data: which format a text-generation dataset is in, whether every record (of preference pairs too) is
well formed, and what TRL's SFTTrainer is given to train on and what the generation evaluation prompts with.

The checks are pure functions over records (a record's index and what is wrong with it); the DataError
they raise names the spec field and the record, so a bad dataset fails the job at once with the permanent
data exit code instead of somewhere inside tokenization.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kubetune_api.spec import DATA_FORMATS

from .errors import DataError

#: Chat roles a messages record may use.
ROLES = ("system", "user", "assistant", "tool")
#: The columns each format reads (preference: the preference task's pairs).
COLUMNS = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}
#: The spec field that names each split.
SPLIT_FIELDS = {"train": "spec.dataset.trainSplit", "eval": "spec.dataset.evalSplit"}
#: Records named in one error at most.
SHOWN = 3


def detect_format(columns: Sequence[str], requested: str | None) -> str:
    """The data format: the requested one if its columns are there, else the one the columns show."""
    found = ", ".join(columns) or "none"
    shown = next((fmt for fmt in DATA_FORMATS if all(c in columns for c in COLUMNS[fmt])), None)
    if requested is not None:
        missing = [c for c in COLUMNS[requested] if c not in columns]
        if missing:
            hint = f"; these columns hold {shown} data: set format: {shown}, or omit format" if shown else ""
            raise DataError(
                "spec.dataset.format",
                f"format {requested} reads the column(s) {', '.join(COLUMNS[requested])}; "
                f"{', '.join(missing)} not found (columns: {found}){hint}",
            )
        return requested
    if shown is None:
        raise DataError(
            "spec.dataset.format",
            f"cannot tell the format from the columns ({found}): give a messages column (a list of {{role, "
            "content}} turns), prompt and completion columns, or a text column",
        )
    return shown


def check_columns(columns: Sequence[str], fmt: str, split: str, which: str = "eval") -> None:
    """A split has the columns of the format (for the evaluation split: the training split's format)."""
    missing = [c for c in COLUMNS[fmt] if c not in columns]
    if missing:
        whose = "the training data's format" if which == "eval" else "the format"
        raise DataError(
            SPLIT_FIELDS[which],
            f"split {split!r} lacks the column(s) {', '.join(missing)} that {whose} {fmt} reads "
            f"(columns: {', '.join(columns) or 'none'})",
        )


def turns_problem(turns: Any, *, answered: bool = True, name: str = "messages") -> str | None:
    """What is wrong with one list of turns, or None. answered: it must hold an assistant turn."""
    if not isinstance(turns, list) or not turns:
        return f"{name} is not a non-empty list of {{role, content}} turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            return f"{name}[{i}] is not a {{role, content}} mapping"
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            return f"{name}[{i}].role is {role!r}; use one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"{name}[{i}].content is {type(content).__name__}, not text"
    if answered and not any(t["role"] == "assistant" for t in turns):
        return "no assistant turn: there is nothing to learn from this conversation"
    return None


def pair_problem(prompt: Any, completion: Any) -> str | None:
    """What is wrong with one prompt-completion record, or None."""
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            return f"{name} is missing"
        if isinstance(value, list):
            problem = turns_problem(value, answered=name == "completion", name=name)
            if problem:
                return problem
        elif not isinstance(value, str):
            return f"{name} is {type(value).__name__}, not text or a list of turns"
    if isinstance(prompt, list) != isinstance(completion, list):
        return "prompt and completion must both be text or both be lists of turns"
    if isinstance(completion, str) and not completion.strip():
        return "completion is empty"
    return None


def answer_text(answer: Any) -> str:
    """The text of an answer: itself, or its turns' contents (pure; the record checks ran first)."""
    return answer if isinstance(answer, str) else "".join(t["content"] for t in answer)


def preference_problem(prompt: Any, chosen: Any, rejected: Any) -> str | None:
    """What is wrong with one preference pair, or None: a prompt and two answers, all text or all turns."""
    values = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for name, value in values.items():
        if value is None:
            return f"{name} is missing"
        if isinstance(value, list):
            problem = turns_problem(value, answered=name != "prompt", name=name)
            if problem:
                return problem
        elif not isinstance(value, str):
            return f"{name} is {type(value).__name__}, not text or a list of turns"
    if len({isinstance(v, list) for v in values.values()}) > 1:
        return "prompt, chosen and rejected must all be text or all be lists of turns"
    for name in ("chosen", "rejected"):
        if not answer_text(values[name]).strip():
            return f"{name} is empty"
    if chosen == rejected:
        return "chosen and rejected are the same answer: the pair prefers nothing"
    return None


def text_problem(text: Any) -> str | None:
    """What is wrong with one text record, or None."""
    if not isinstance(text, str) or not text.strip():
        return "text is missing or empty"
    return None


def record_problems(records: Iterable[Mapping[str, Any]], fmt: str) -> list[tuple[int, str]]:
    """(index, problem) for the first few bad records (pure)."""
    out: list[tuple[int, str]] = []
    for i, record in enumerate(records):
        if fmt == "messages":
            problem = turns_problem(record.get("messages"))
        elif fmt == "prompt-completion":
            problem = pair_problem(record.get("prompt"), record.get("completion"))
        elif fmt == "preference":
            problem = preference_problem(record.get("prompt"), record.get("chosen"), record.get("rejected"))
        else:
            problem = text_problem(record.get("text"))
        if problem:
            out.append((i, problem))
            if len(out) == SHOWN:
                break
    return out


def check_records(splits: Mapping[str, Any], fmt: str, source_split: Mapping[str, str]) -> None:
    """Every record of every split is well formed, and no split is empty."""
    for name, ds in splits.items():
        field = SPLIT_FIELDS[name]
        if len(ds) == 0:
            raise DataError(field, f"split {source_split[name]!r} is empty")
        bad = record_problems(ds.select_columns(list(COLUMNS[fmt])), fmt)
        if bad:
            listed = "; ".join(f"record {i}: {p}" for i, p in bad)
            raise DataError(field, f"split {source_split[name]!r} ({fmt}) has bad records: {listed}")


def split_turns(turns: list[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt turns, [the last assistant turn]): a conversation as a conversational prompt-completion pair.
    Turns after the last assistant turn answer nothing and are dropped."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    plain = [{"role": t["role"], "content": t["content"]} for t in turns[: last + 1]]
    return plain[:last], [plain[last]]


def as_last_turn(record: Mapping[str, Any]) -> dict[str, Any]:
    """A messages record as a prompt-completion one (datasets.map): the loss counts the last assistant turn."""
    prompt, completion = split_turns(record["messages"])
    return {"prompt": prompt, "completion": completion}


def earlier_assistant_turns(records: Iterable[Sequence[Mapping[str, Any]]]) -> int:
    """Conversations with an assistant turn before their last one (context only when training on the last)."""
    return sum(1 for turns in records if sum(t["role"] == "assistant" for t in turns) > 1)


def generation_pairs(records: Iterable[Mapping[str, Any]], fmt: str, limit: int) -> list[tuple[Any, str]]:
    """(prompt, reference answer) for the first `limit` evaluation records: the prompt is text or a list of
    turns, the reference the completion's text or the text of its (or the conversation's) last assistant turn."""
    out: list[tuple[Any, str]] = []
    for record in records:
        if len(out) == limit:
            break
        if fmt == "messages":
            prompt, completion = split_turns(record["messages"])
            out.append((prompt, completion[0]["content"]))
        else:
            answer = record["completion"]
            if not isinstance(answer, str):  # turns: check_records made sure one is the assistant's
                answer = next(t["content"] for t in reversed(answer) if t["role"] == "assistant")
            out.append((record["prompt"], answer))
    return out
