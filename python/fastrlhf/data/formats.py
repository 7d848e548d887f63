"""Recognize a dataset's format, validate every row, and render prompts as text.

Accepted formats (the first that matches the dataset's columns wins):

* chat:     ``messages`` = [{"role": "system"|"user"|"assistant", "content": str}, ...];
            the last assistant turn is the answer, the turns before it the prompt.
* chat pairs: ``chosen`` / ``rejected`` = message lists that share all turns but the last
            (an assistant turn); a ``prompt`` column, if any, is ignored.
* pairs:    ``prompt`` + ``chosen`` + ``rejected`` strings.
* HH pairs: ``chosen`` + ``rejected`` strings holding whole "Human: ... Assistant: ..."
            dialogues (no prompt column): the prompt is the text up to the last "Assistant:".
* SFT:      a prompt (``prompt`` | ``question`` | ``instruction``) + a response
            (``response`` | ``completion`` | ``answer`` | ``output``); exactly one of each,
            except that ``answer`` beside another response column is a ground-truth column
            (e.g. the final number a reward function checks), not the response.
            A non-empty ``input`` next to ``instruction`` (Alpaca) is appended to the prompt
            after a blank line.
* prompts:  a prompt column alone (usable by PPO only).

Every column but the prompt's (``messages`` for chat rows) is kept with the row as its
``columns`` (a dict), which step-3 items carry to the reward functions.

Rendering: a prompt that already ends in "Assistant:" is used as is. Otherwise it goes
through the tokenizer's chat template (``add_generation_prompt=True``) when the tokenizer
has one, else through the plain template ``"Human: {user}\\n\\nAssistant:"`` (a system turn
is rendered as ``"{system}\\n\\n"``, an earlier assistant turn as ``"Assistant: {text}\\n\\n"``),
and the answer follows after one space. EOS is appended by the tokenization step, so an
EOS the chat template writes after the answer is removed from the answer text.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastrlhf.errors import DataError


def where(source: str, row: int | None = None, column: str | None = None) -> str:
    """'file X, row N, column 'c'' (rows count from 0, as in the file's record order)."""
    parts = [f"{source}"]
    if row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column {column!r}")
    return ", ".join(parts)

PROMPT_ALIASES = ("prompt", "question", "instruction")
RESPONSE_ALIASES = ("response", "completion", "answer", "output")
ROLES = ("system", "user", "assistant")
ASSISTANT_TAG = "Assistant:"


@dataclass
class Sample:
    prompt: str                   # rendered prompt text, ends where the answer begins
    chosen: str | None = None     # answer text (the SFT target; the preferred answer of a pair)
    rejected: str | None = None   # the dispreferred answer, for pairs
    columns: dict | None = None   # the row's other columns (ground truth for reward functions)
    messages: list | None = None  # the prompt as messages (None: a prompt given already rendered); multi-turn
                                  # rollouts re-render it (e.g. with tool descriptions)


def _one_alias(columns: set, aliases: tuple, source: str, what: str) -> str | None:
    present = [c for c in aliases if c in columns]
    if len(present) > 1:
        raise DataError(f"{source}: ambiguous {what} column, found {present}. Fix: keep exactly one of "
                        f"{list(aliases)} (rename or drop the others)")
    return present[0] if present else None


def detect_format(rows: list[dict], source: str) -> tuple[str, dict]:
    """The format name and the columns it uses, from the union of the rows' keys."""
    columns = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where(source, i)}: a row must be an object with named columns, got "
                            f"{type(row).__name__}. Fix: write each row as {{\"prompt\": ..., ...}}")
        columns |= set(row)
    if not rows:
        raise DataError(f"{source}: the dataset has no rows. Fix: point at a non-empty dataset")
    if "messages" in columns:
        return "chat", {"messages": "messages"}
    prompt_col = _one_alias(columns, PROMPT_ALIASES, source, "prompt")
    if "chosen" in columns and "rejected" in columns:
        sample = next(r.get("chosen") for r in rows)
        if isinstance(sample, list):
            return "chat_pairs", {"chosen": "chosen", "rejected": "rejected"}
        if prompt_col is None:
            return "hh_pairs", {"chosen": "chosen", "rejected": "rejected"}
        return "pairs", {"prompt": prompt_col, "chosen": "chosen", "rejected": "rejected"}
    responses = [c for c in RESPONSE_ALIASES if c in columns]
    if "answer" in responses and len(responses) == 2:
        responses.remove("answer")   # "answer" beside a response column is ground truth, not the response
    response_col = _one_alias(set(responses), RESPONSE_ALIASES, source, "response")
    if "chosen" in columns and prompt_col is not None and response_col is None:
        response_col = "chosen"    # chosen without rejected: an SFT set
    if prompt_col is not None and response_col is not None:
        return "sft", {"prompt": prompt_col, "response": response_col}
    if prompt_col is not None:
        return "prompts", {"prompt": prompt_col}
    raise DataError(
        f"{source}: no recognizable columns (found {sorted(columns)}). Fix: provide prompt/chosen/"
        f"rejected, prompt/response (or completion/answer/output), chosen/rejected dialogues, "
        f"or chat 'messages' = [{{'role': ..., 'content': ...}}]")


def _check_text(value, source: str, i: int, column: str) -> str:
    if value is None:
        raise DataError(f"{where(source, i, column)}: missing value. Fix: give every row a non-empty "
                        f"string in {column!r}, or remove the row")
    if not isinstance(value, str):
        raise DataError(f"{where(source, i, column)}: expected a string, got {type(value).__name__} "
                        f"({value!r:.60}). Fix: store the text as a string")
    if not value.strip():
        raise DataError(f"{where(source, i, column)}: empty text. Fix: fill in the text or remove the row")
    return value


def _text(row: dict, column: str, source: str, i: int) -> str:
    return _check_text(row.get(column), source, i, column)


def _messages(row: dict, column: str, source: str, i: int) -> list[dict]:
    value = row.get(column)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where(source, i, column)}: expected a non-empty list of "
                        f"{{'role', 'content'}} messages, got {type(value).__name__}. Fix: write "
                        f"[{{\"role\": \"user\", \"content\": \"...\"}}, ...]")
    out = []
    for k, m in enumerate(value):
        label = f"{column}[{k}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where(source, i, label)}: each message needs a 'role' in {ROLES}, got "
                            f"{m!r:.80}. Fix: write {{\"role\": \"user\", \"content\": \"...\"}}")
        out.append({"role": m["role"], "content": _check_text(m.get("content"), source, i, f"{label}.content")})
    return out


class PromptRenderer:
    """Turns prompts (text or message lists) and answers into the exact text the model sees.

    Rendered prompts and the template's wrapping of an answer are memoized per prompt, since
    datasets repeat prompts and Jinja rendering is the slow part of loading.
    """

    _SENTINEL = "\u2063FASTRLHF_ANSWER\u2063"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None)
        self.eos_text = getattr(tokenizer, "eos_token", None)
        self._prompts: dict = {}
        self._wrappers: dict = {}

    @staticmethod
    def _key(messages: list[dict]) -> tuple:
        return tuple((m["role"], m["content"]) for m in messages)

    def prompt(self, messages: list[dict]) -> str:
        key = self._key(messages)
        if key not in self._prompts:
            self._prompts[key] = self._render_prompt(messages)
        return self._prompts[key]

    def _render_prompt(self, messages: list[dict]) -> str:
        if self.template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = []
        for m in messages:
            if m["role"] == "user":
                parts.append(f"Human: {m['content']}\n\n")
            elif m["role"] == "assistant":
                parts.append(f"{ASSISTANT_TAG} {m['content']}\n\n")
            else:
                parts.append(f"{m['content']}\n\n")
        return "".join(parts) + ASSISTANT_TAG

    def _wrapper(self, head: list[dict], rendered_prompt: str) -> tuple[str, str] | None:
        """(before, after) the template writes around an answer that follows ``head``; None if opaque."""
        key = self._key(head)
        if key not in self._wrappers:
            full = self.tokenizer.apply_chat_template(
                head + [{"role": "assistant", "content": self._SENTINEL}], tokenize=False)
            wrap = None
            if full.startswith(rendered_prompt) and full.count(self._SENTINEL) == 1:
                before, after = full[len(rendered_prompt):].split(self._SENTINEL)
                after = after.rstrip()
                if self.eos_text and after.endswith(self.eos_text):
                    after = after[: -len(self.eos_text)].rstrip()
                wrap = (before, after)
            self._wrappers[key] = wrap
        return self._wrappers[key]

    def answer(self, prompt_messages: list[dict] | None, rendered_prompt: str, answer: str) -> str:
        """Answer text as it follows the rendered prompt (template's own wrapping kept, EOS dropped)."""
        if self.template and prompt_messages is not None:
            wrap = self._wrapper(prompt_messages, rendered_prompt)
            if wrap is not None:
                return wrap[0] + answer + wrap[1]
        return answer if answer[:1].isspace() else " " + answer


def _split_hh(text: str, source: str, i: int, column: str) -> tuple[str, str]:
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0 or not text[cut + len(ASSISTANT_TAG):].strip():
        raise DataError(f"{where(source, i, column)}: a dialogue without a prompt column must end in "
                        f"'{ASSISTANT_TAG} <answer>'. Fix: add a 'prompt' column or use the "
                        f"'Human: ... Assistant: ...' layout")
    return text[:cut + len(ASSISTANT_TAG)], text[cut + len(ASSISTANT_TAG):]


@dataclass
class ParsedRow:
    """A validated row before rendering: the prompt as text or messages, and its answers."""
    prompt_text: str | None = None          # a text prompt (rendered as a user turn unless pre-rendered)
    prompt_messages: list | None = None     # a chat prompt
    answers: tuple = ()                     # (chosen,) or (chosen, rejected); raw answer text
    columns: dict | None = None             # the row's other columns, passed through

    def render(self, renderer: PromptRenderer) -> Sample:
        if self.prompt_messages is not None:
            head = self.prompt_messages
            prompt = renderer.prompt(head)
        elif self.prompt_text.rstrip().endswith(ASSISTANT_TAG):
            head, prompt = None, self.prompt_text.rstrip()
        else:
            head = [{"role": "user", "content": self.prompt_text}]
            prompt = renderer.prompt(head)
        answers = [renderer.answer(head, prompt, a) for a in self.answers]
        answers += [None] * (2 - len(answers))
        return Sample(prompt, *answers, columns=self.columns, messages=head)


def parse_rows(rows: list[dict], source: str) -> list[ParsedRow]:
    """Validate every row (cheap; no rendering); the first bad row raises DataError."""
    fmt, cols = detect_format(rows, source)
    own = {"messages"} if fmt == "chat" else {cols["prompt"]} if "prompt" in cols else set()
    out = []
    for i, row in enumerate(rows):
        parsed = _parse_row(fmt, cols, row, source, i)
        parsed.columns = {k: v for k, v in row.items() if k not in own}
        out.append(parsed)
    return out


def _parse_row(fmt: str, cols: dict, row: dict, source: str, i: int) -> ParsedRow:
    if fmt in ("pairs", "sft", "prompts"):
        answers = tuple(_text(row, cols[c], source, i) for c in ("chosen", "rejected", "response") if c in cols)
        prompt = _text(row, cols["prompt"], source, i)
        extra = row.get("input") if cols["prompt"] == "instruction" else None
        if isinstance(extra, str) and extra.strip():     # Alpaca layout: instruction + optional input
            prompt = f"{prompt}\n\n{extra}"
        return ParsedRow(prompt_text=prompt, answers=answers)
    if fmt == "hh_pairs":
        prompt, chosen = _split_hh(_text(row, "chosen", source, i), source, i, "chosen")
        prompt_r, rejected = _split_hh(_text(row, "rejected", source, i), source, i, "rejected")
        if prompt_r != prompt:
            raise DataError(f"{where(source, i, 'rejected')}: the dialogue before the last "
                            f"'{ASSISTANT_TAG}' differs from 'chosen'. Fix: both must share the prompt")
        return ParsedRow(prompt_text=prompt, answers=(chosen.lstrip(), rejected.lstrip()))
    if fmt == "chat":
        messages = _messages(row, "messages", source, i)
        if messages[-1]["role"] != "assistant":
            return ParsedRow(prompt_messages=messages)
        if len(messages) < 2:
            raise DataError(f"{where(source, i, 'messages')}: only an assistant turn, no prompt. "
                            f"Fix: start the conversation with a user turn")
        return ParsedRow(prompt_messages=messages[:-1], answers=(messages[-1]["content"],))
    chosen = _messages(row, "chosen", source, i)          # chat_pairs
    rejected = _messages(row, "rejected", source, i)
    if (len(chosen) < 2 or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant"
            or chosen[:-1] != rejected[:-1]):
        raise DataError(f"{where(source, i, 'chosen')}: 'chosen' and 'rejected' must share every turn but "
                        f"the last, which must be an assistant turn after at least one prompt turn. Fix: "
                        f"make the dialogues differ only in the final assistant answer")
    return ParsedRow(prompt_messages=chosen[:-1], answers=(chosen[-1]["content"], rejected[-1]["content"]))

