"""`fastrlhf chat --model PATH`: multi-turn chat with a trained model on the hybrid engine.

The conversation is rendered with the tokenizer's chat template when it has one (the bundled
task's tokenizer does; fastrlhf's data uses the same template for training), else as
"Human: ...\\n\\nAssistant: ..." turns. When the history outgrows the model's positions the
oldest turns are dropped, and the user is told. `--prompt TEXT` answers once and exits.
Commands in the interactive loop: `clear` (new conversation), `quit` / `exit` (or Ctrl-D).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

import torch


class ChatSession:
    def __init__(self, model_path: str, *, max_new_tokens: int = 128, temperature: float = 0.7,
                 top_p: float = 0.9, top_k: int = 0, greedy: bool = False, fallback: Optional[str] = None,
                 seed: int = 0, dtype: str = "fp32", device: Optional[str] = None):
        from ..hybrid_engine import EngineConfig, HybridEngine
        from ..models.loading import load_causal_lm, load_tokenizer, max_positions
        from ..models.paths import check_model_path
        check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy)
        check_model_path(model_path, "policy", option="--model", tokenizer=True)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(model_path, padding_side="left")
        self.model = load_causal_lm(model_path, tokenizer=self.tokenizer, dtype=dtype).to(self.device).eval()
        self.engine = HybridEngine(self.model, self.tokenizer, EngineConfig(fallback=fallback))
        self.gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature,
                               top_p=top_p, top_k=top_k, eos_token_id=self.tokenizer.eos_token_id,
                               pad_token_id=self.tokenizer.pad_token_id)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.max_positions = max_positions(self.model.config)
        self.messages: List[Dict[str, str]] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.messages, self.dropped_turns = [], 0

    def render(self, messages: List[Dict[str, str]]) -> List[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            return list(ids)
        text = "".join(f"{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n\n" for m in messages)
        return tok(text + "Assistant:")["input_ids"]

    def _fit(self) -> List[int]:
        """Rendered history that leaves room for the answer, dropping the oldest turns."""
        budget = (self.max_positions or 10 ** 9) - self.gen_kwargs["max_new_tokens"]
        while True:
            ids = self.render(self.messages)
            if len(ids) <= budget:
                return ids
            if len(self.messages) <= 1:
                from ..errors import ConfigError  # a ValueError: the loop shows it; --prompt stops with it
                raise ConfigError(f"the message is {len(ids)} tokens; with {self.gen_kwargs['max_new_tokens']} "
                                 f"new tokens it exceeds the model's {self.max_positions} positions. Send a "
                                 "shorter message or lower --max_new_tokens")
            self.messages = self.messages[2:]  # one user + assistant turn
            self.dropped_turns += 1

    @torch.no_grad()
    def reply(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._fit()
        except ValueError:
            self.messages.pop()
            raise
        input_ids = torch.tensor([ids], device=self.device)
        out = self.engine.generate(input_ids, torch.ones_like(input_ids), generator=self.generator, **self.gen_kwargs)
        new = out.sequences[0, input_ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in new:
            new = new[:new.index(eos)]
        answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def check_settings(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int, greedy: bool) -> None:
    """The sampling options, checked before the model loads (ConfigError, a ValueError)."""
    from ..errors import ConfigError
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ConfigError("temperature must be > 0 when sampling; pass --greedy for greedy decoding")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = off), got {top_k}")


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH", help="a model dir (e.g. <output>/step3_ppo/actor)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--fallback", choices=("hf",), default=None, help="plain HF generate instead of the engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")


def as_utf8(text: str, write: Callable[[str], None]) -> str:
    """`text` with bytes that were not UTF-8 (surrogates, as Python decodes them with
    surrogateescape) replaced by U+FFFD, and a warning when there were any."""
    n = sum(0xDC80 <= ord(c) <= 0xDCFF for c in text)
    if not n:
        return text
    clean = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    write(f"(warning: {n} byte{'s' * (n > 1)} of your message {'are' if n > 1 else 'is'} not UTF-8 and "
          f"{'were' if n > 1 else 'was'} replaced: {clean!r})")
    return clean


def _tolerant_stdin() -> None:
    """Undecodable input bytes reach the loop as surrogates (replaced there with a warning) instead of
    raising UnicodeDecodeError out of input() and ending the session."""
    if hasattr(sys.stdin, "reconfigure"):
        try:
            sys.stdin.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # a stream that cannot change now
            pass


def run_chat(args: argparse.Namespace, read: Callable[[str], str] = input,
             write: Callable[[str], None] = print) -> int:
    session = ChatSession(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, greedy=args.greedy, fallback=args.fallback,
                          seed=args.seed, dtype=args.dtype)
    if args.prompt is not None:
        write(session.reply(as_utf8(args.prompt, write)))
        return 0
    if read is input:
        _tolerant_stdin()
    write("fastrlhf chat: type a message; 'clear' starts over, 'quit' exits.")
    while True:
        try:
            text = as_utf8(read("you> "), write).strip()
        except EOFError:
            return 0
        except UnicodeDecodeError as e:  # a reader that decodes strictly: the line is lost, the session is not
            write(f"(warning: your message was not UTF-8 ({e.reason} at byte {e.start}) and was dropped; "
                  "send it again as UTF-8)")
            continue
        if text in ("quit", "exit"):
            return 0
        if text == "clear":
            session.reset()
            write("(new conversation)")
            continue
        if not text:
            continue
        dropped = session.dropped_turns
        try:
            answer = session.reply(text)
        except ValueError as e:
            write(f"(error: {e})")
            continue
        if session.dropped_turns > dropped:
            write(f"(history too long for the model: dropped the {session.dropped_turns - dropped} oldest turn(s))")
        write(f"bot> {answer}")


def main(argv=None) -> int:
    """Raises ConfigError (a ValueError, one line) for a bad model path or option; the `fastrlhf`
    command prints it as `fastrlhf chat: error: ...`."""
    from ..errors import ConfigError
    from ..options import did_you_mean
    p = argparse.ArgumentParser(prog="fastrlhf chat", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_arguments(p)
    args, extra = p.parse_known_args(argv)
    if extra:
        key = extra[0][2:].partition("=")[0] if extra[0].startswith("--") else None
        known = [o[2:] for o in p._option_string_actions if o.startswith("--")]
        raise ConfigError(f"unknown option --{key}{did_you_mean(key, known, '--')}" if key else
                          f"unexpected argument {extra[0]!r}; options look like --key value")
    return run_chat(args)


if __name__ == "__main__":
    from ..errors import ConfigError as _ConfigError
    try:
        sys.exit(main())
    except _ConfigError as e:
        sys.exit(f"fastrlhf chat: error: {e}")
