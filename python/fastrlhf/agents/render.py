"""Text <-> tokens at turn boundaries: the prompt of a trajectory (with the tools described) and
the environment's turns, rendered as text and tokenized on their own. The model's own turns are
never rendered or tokenized here: they stay the tokens it sampled.

With a chat template, an environment turn is what the template writes between the end of the
assistant's message and the start of the next assistant message (`template(conv + msgs,
add_generation_prompt=True)` after the assistant's content), found with a sentinel; an EOS the
template writes right after the assistant's content is left out when the model generated it.
Without a template (the plain "Human:/Assistant:" format of fastrlhf.data.formats):
`"\\n\\nHuman: {text}\\n\\nAssistant:"` for an environment, `"\\n\\n<tool_response>\\n{text}\\n</tool_response>"`
per tool result, then `"\\n\\nAssistant:"`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from .tools import plain_tool_block

_SENTINEL = "\u2063FASTRLHF_TURN\u2063"
_USER = "\u2063FASTRLHF_USER\u2063"


class TurnRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None)
        self.eos_text = getattr(tokenizer, "eos_token", None)
        self.bos_text = getattr(tokenizer, "bos_token", None)
        self._renders_tools: Optional[bool] = None

    # ------------------------------------------------------------------ prompts

    def renders_tools(self, schemas: List[Dict[str, Any]]) -> bool:
        """Whether the chat template writes `tools=` (rendering with and without them differs)."""
        if self._renders_tools is None:
            self._renders_tools = False
            if self.template:
                msgs = [{"role": "user", "content": "x"}]
                try:
                    with_tools = self._apply(msgs, tools=schemas)
                    self._renders_tools = with_tools != self._apply(msgs)
                except Exception:
                    self._renders_tools = False
        return self._renders_tools

    def _apply(self, messages, tools=None, generation_prompt=True) -> str:
        kw = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **kw)

    def prompt_text(self, messages: Optional[List[Dict[str, str]]], rendered: str,
                    tools: Optional[List[Dict[str, Any]]] = None) -> str:
        """The prompt as text: `messages` rendered (with `tools` described), or the already
        rendered prompt when there are no messages (tools as a plain block in front of it)."""
        if messages is None:
            return (plain_tool_block(tools) + "\n\n" + rendered) if tools else rendered
        if self.template:
            if tools and self.renders_tools(tools):
                return self._apply(messages, tools=tools)
            if tools:
                messages = self._with_system(messages, plain_tool_block(tools))
            return self._apply(messages)
        head = (plain_tool_block(tools) + "\n\n") if tools else ""
        parts = []
        for m in messages:
            role, text = m["role"], m["content"]
            parts.append(f"Human: {text}\n\n" if role == "user" else f"Assistant: {text}\n\n" if role == "assistant"
                         else f"{text}\n\n")
        return head + "".join(parts) + "Assistant:"

    def _with_system(self, messages, block: str):
        """The plain tool block as (the start of) a system message, or of the first user message
        for templates that refuse a system role."""
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": block + "\n\n" + messages[0]["content"]}] + list(messages[1:])
        candidate = [{"role": "system", "content": block}] + list(messages)
        try:
            self._apply(candidate)
            return candidate
        except Exception:
            first = messages[0]
            return [{"role": first["role"], "content": block + "\n\n" + first["content"]}] + list(messages[1:])

    def encode_prompt(self, text: str) -> List[int]:
        """Tokenized as the data pipeline tokenizes prompts: special tokens added unless the text
        already starts with BOS (a template that writes it)."""
        add = not (self.bos_text and text.startswith(self.bos_text))
        return list(self.tokenizer(text, add_special_tokens=add)["input_ids"])

    # ------------------------------------------------------------------ environment turns

    def turn_text(self, messages: Sequence[Tuple[str, str]], model_closed: bool) -> str:
        """The text of an environment turn holding `messages` [(role, text)] (role "user" for an
        environment, "tool" for a tool result) that follows an assistant turn; `model_closed`:
        the model ended its turn with EOS (else the template's closing is part of this text)."""
        if not self.template:
            body = "".join(f"\n\nHuman: {text}" if role == "user" else
                           f"\n\n<tool_response>\n{text}\n</tool_response>" for role, text in messages)
            return body + "\n\nAssistant:"
        conv = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _SENTINEL}]
        try:
            full = self._apply(conv + [{"role": role, "content": text} for role, text in messages])
        except Exception:   # a template without a tool role: the result in a user turn, Hermes-style
            full = self._apply(conv + [{"role": "user", "content": text if role == "user" else
                                        f"<tool_response>\n{text}\n</tool_response>"} for role, text in messages])
        tail = full[full.index(_SENTINEL) + len(_SENTINEL):]
        if model_closed and self.eos_text:
            stripped = tail.lstrip(" ")
            if stripped.startswith(self.eos_text):
                tail = stripped[len(self.eos_text):]
        return tail

    def encode_turn(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def turn_ids(self, messages: Sequence[Tuple[str, str]], model_closed: bool,
                 budget: int) -> Tuple[Optional[List[int]], bool]:
        """(token ids of the turn, whether its texts were cut to fit `budget` tokens); None when
        even empty messages do not fit (the trajectory ends there)."""
        ids = self.encode_turn(self.turn_text(messages, model_closed))
        if len(ids) <= budget:
            return ids, False
        empty = self.encode_turn(self.turn_text([(r, "") for r, _ in messages], model_closed))
        room = budget - len(empty)
        if room < 0:
            return None, True
        contents = [self.encode_turn(t) for _, t in messages]
        for _ in range(8):   # decoding and re-tokenizing a cut text can change a count slightly
            excess = sum(map(len, contents)) - room
            while excess > 0:
                longest = max(range(len(contents)), key=lambda i: len(contents[i]))
                cut = min(excess, len(contents[longest]))
                contents[longest] = contents[longest][:len(contents[longest]) - cut]
                excess -= cut
            texts = [(r, self.tokenizer.decode(c, skip_special_tokens=True)) for (r, _), c in zip(messages, contents)]
            ids = self.encode_turn(self.turn_text(texts, model_closed))
            if len(ids) <= budget:
                return ids, True
            room -= len(ids) - budget
        return None, True
