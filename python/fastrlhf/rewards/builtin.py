"""Built-in verifiable rewards, each a batched reward function
`fn(prompts, completions, **columns) -> list[float | None]` usable as `--reward_fn
fastrlhf.rewards:NAME`, plus the single-answer helpers they are made of.

Math answers: the final answer of a completion is, by priority, the content of the last
`\\boxed{...}`, the text after the last `####` (GSM8K), else the last number in the text.
Numbers are compared exactly as fractions: `1,000` == `1000`, `0.5` == `1/2` == `\\frac{1}{2}`,
`-3` == `−3` == `- 3`, `7.` == `7.0` == `+7`; anything that is not a number is compared as
normalised text (spaces, `$`, a trailing period and `\\text{}` dropped, lowercase).
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Callable, List, Optional, Sequence

# a number: optional sign, digits with optional thousands separators, optional decimals, or .5
_NUMBER = r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+\u2212]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})(?:\s*/\s*\d+)?")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")


def _boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion: last \\boxed{}, else after the last ####, else the last
    number; None when there is none."""
    if text is None:
        return None
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        line = tail.splitlines()[0].strip() if tail else ""
        if parse_number(line) is not None:
            return line
        number = _NUMBER_RE.search(line.replace("$", ""))
        return number.group(0) if number else (line or None)
    numbers = _NUMBER_RE.findall(text.replace("$", ""))
    return numbers[-1] if numbers else None


def parse_number(text: Optional[str]) -> Optional[Fraction]:
    """`text` as an exact number (integers, decimals, fractions a/b or \\frac{a}{b}, thousands
    separators, signs, a trailing period, `$`, `%` not included); None when it is not one."""
    if text is None:
        return None
    s = str(text).strip()
    s = _TEXT_RE.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("$", "").replace("\u2212", "-").replace(" ", "").rstrip(".").strip()
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    m = re.fullmatch(r"([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        return (-1 if m.group(1) == "-" else 1) * num / den
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[-+]?\d+/\d+", s):
        num, den = s.split("/")
        return None if int(den) == 0 else Fraction(int(num), int(den))
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s):
        return Fraction(s.rstrip(".") if s.endswith(".") else s)
    return None


def normalize_text_answer(text: Optional[str]) -> str:
    s = _TEXT_RE.sub(r"\1", str(text or ""))
    return re.sub(r"\s+", "", s.replace("$", "")).rstrip(".").lower()


def answers_match(predicted: Optional[str], reference) -> bool:
    """Exact match of two final answers: numerically when both are numbers, else as normalised text."""
    if predicted is None or reference is None:
        return False
    a, b = parse_number(predicted), parse_number(str(reference))
    if a is not None and b is not None:
        return a == b
    return normalize_text_answer(predicted) == normalize_text_answer(str(reference)) != ""


def _column(columns: dict, names: Sequence[str], fn: str, n: int) -> list:
    for name in names:
        if name in columns:
            values = list(columns[name])
            return values
    raise KeyError(f"{fn} needs the dataset's ground truth in a column named {' or '.join(names)}; "
                   f"the rows have {sorted(columns) or 'no other columns'}")


def math_answer_match(prompts: List[str], completions: List[str], **columns) -> List[Optional[float]]:
    """1.0 when the completion's final answer (\\boxed{}, ####, or last number) equals the row's
    `answer` (or `solution`, `ground_truth`) column, else 0.0; None for a row with no answer."""
    refs = _column(columns, ("answer", "solution", "ground_truth"), "math_answer_match", len(completions))
    out: List[Optional[float]] = []
    for completion, ref in zip(completions, refs):
        if ref is None:
            out.append(None)
            continue
        ref = str(ref)
        ref_answer = extract_answer(ref) if ("####" in ref or "\\boxed" in ref) else ref
        out.append(float(answers_match(extract_answer(completion), ref_answer)))
    return out


def arithmetic_reward(prompts: List[str], completions: List[str], answer: List, **_) -> List[float]:
    """The bundled arithmetic task's exact scorer: 1.0 when the final answer equals `answer`."""
    return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answer)]


def calculator_reward(prompts: List[str], completions: List[str], answer: List, **_) -> List[float]:
    """The bundled calculator task's exact scorer: 1.0 when the number after the last ``####``
    equals `answer`. A ``####`` is required: a trajectory's text holds the tool's answer too, which
    must not count as the model's."""
    return [float("####" in c and answers_match(extract_answer(c[c.rindex("####"):]), a))
            for c, a in zip(completions, answer)]


THINK_ANSWER = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


def make_format_reward(pattern: str = THINK_ANSWER, *, full: bool = True,
                       flags: int = re.DOTALL) -> Callable[..., List[float]]:
    """A reward function: 1.0 when the completion matches `pattern` (the whole completion when
    `full`, else anywhere), else 0.0."""
    rx = re.compile(pattern, flags)
    match = rx.fullmatch if full else rx.search

    def format_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
        return [1.0 if match(c) else 0.0 for c in completions]
    format_reward.__name__ = "format_reward"
    return format_reward


format_reward = make_format_reward()
format_reward.__doc__ = "1.0 for `<think>...</think> <answer>...</answer>` completions, else 0.0."


def make_length_penalty(max_words: int = 200, scale: Optional[int] = None) -> Callable[..., List[float]]:
    """A reward function: 0 up to `max_words` words, then falling linearly by 1 per `scale` words
    (default max_words), floored at -1."""
    if max_words < 0:
        raise ValueError(f"max_words must be >= 0, got {max_words}")
    span = scale or max(max_words, 1)

    def length_penalty(prompts: List[str], completions: List[str], **_) -> List[float]:
        return [-min(1.0, max(0, len(c.split()) - max_words) / span) for c in completions]
    length_penalty.__name__ = "length_penalty"
    return length_penalty


length_penalty = make_length_penalty()


def default_task_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """The bundled default task's exact scorer (fastrlhf.tasks.default_task.ground_truth_score)."""
    from fastrlhf.tasks.default_task import ground_truth_score
    return [ground_truth_score(p, c) for p, c in zip(prompts, completions)]


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
