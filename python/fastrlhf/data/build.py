"""build_datasets: read, validate, split across the three steps, blend, tokenize, cache."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass

import torch

from fastrlhf.errors import DataError
from fastrlhf.data.formats import PromptRenderer, Sample, parse_rows
from fastrlhf.data.sources import read_source, source_fingerprint
from fastrlhf.data.spec import DataSpec
from fastrlhf.data.encoding import StepTokenizer, TokenizedDataset, log_stats

CACHE_VERSION = 2  # 2: step-3 items carry the rows' other columns
STEP_NEEDS = {1: "a prompt and an answer (prompt/chosen or prompt/response or chat messages)",
              2: "prompt/chosen/rejected pairs", 3: "prompts"}


def split_indices(n: int, ratios: list[float], seed: int) -> list[list[int]]:
    """Disjoint shares of range(n) for steps 1, 2, 3: one seeded permutation cut by the ratios.

    The permutation depends only on the seed and n, so the same data gets the same split
    whichever step is being built and however its path is spelled.
    """
    order = list(range(n))
    random.Random(f"fastrlhf-split:{seed}:{n}").shuffle(order)
    cuts = [0, round(n * ratios[0]), round(n * (ratios[0] + ratios[1])), n]
    return [order[cuts[k]:cuts[k + 1]] for k in range(3)]


def _eval_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.ceil(n * fraction)))


def eval_row_indices(n: int, spec: DataSpec, step: int) -> list[int]:
    """The rows of an n-row dataset (one without a test split) that ``spec`` holds out for step
    ``step``'s eval: what `build_datasets` takes them from (a generator of bundled data reads this
    to keep its held-out problems out of every training row)."""
    share = _share(n, spec.step_ratios(), spec.seed, step)
    return share[:_eval_count(len(share), spec.eval_fraction)]


def _usable(step: int, s: Sample) -> bool:
    if step == 1:
        return s.chosen is not None
    if step == 2:
        return s.chosen is not None and s.rejected is not None
    return True


def _weighted(rows: list, weight: float, rng: random.Random) -> list:
    """``weight`` copies of ``rows``: whole copies, then a seeded sample for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    return rows * whole + rng.sample(rows, round(len(rows) * frac))


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.bos_token,
             tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id]
    return hashlib.sha256((body + json.dumps(extra, default=str)).encode()).hexdigest()


def _cache_path(spec: DataSpec, tokenizer, step: int, paths: list[str]) -> str | None:
    if not spec.cache_dir:
        return None
    fields = {k: v for k, v in spec.to_dict().items() if k not in ("cache_dir", "paths")}
    key = json.dumps({"v": CACHE_VERSION, "step": step, "spec": fields, "tokenizer": tokenizer_fingerprint(tokenizer),
                      "sources": [source_fingerprint(p) for p in paths]}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(spec.cache_dir, f"step{step}-{digest}.pt")


def _render(name: str, parsed: list, indices: list[int], renderer: PromptRenderer) -> list[Sample]:
    out = []
    for i in indices:
        try:
            out.append(parsed[i].render(renderer))
        except Exception as e:   # a chat template may refuse a conversation (e.g. roles not alternating)
            raise DataError(f"{name}, row {i}: the tokenizer's chat template failed on this row "
                            f"({type(e).__name__}: {e}). Fix: make the row fit the template, or use a "
                            f"tokenizer whose template accepts it") from None
    return out


STEP_NAMES = {1: "SFT", 2: "preference pairs", 3: "PPO prompts"}
logger = logging.getLogger("fastrlhf.data")


def _share(n: int, ratios: list[float] | None, seed: int, step: int) -> list[int]:
    """The indices of ``step``'s share of n rows: all of them (seeded order) when ratios is None."""
    return split_indices(n, ratios or [1.0, 0.0, 0.0], seed)[step - 1 if ratios else 0]


@dataclass
class _SourceReport:
    """What one dataset gave a step: printed, and warned about when it gave nothing."""
    name: str
    rows: int              # all train rows of the dataset
    share: int             # rows of the step's share (all rows without split_ratios)
    unusable: int          # rows of the share (train and eval) without what the step needs
    train: int             # train rows after weighting
    eval: int
    weight: float
    eval_from_test: bool

    def line(self, spec: DataSpec, step: int) -> str:
        if spec.split_ratios is None:
            where = f"all {self.rows} rows; split_ratios not applied"
        else:
            where = f"step {step}'s share of its {self.rows} rows, split_ratios {spec.split_ratios}"
        extra = f", weight {self.weight:g}" if self.weight != 1.0 else ""
        extra += ", eval rows from its test split" if self.eval_from_test else ""
        skipped = f"; {self.unusable} rows skipped: step {step} needs {STEP_NEEDS[step]}" if self.unusable else ""
        return (f"data, step {step} ({STEP_NAMES[step]}): {self.train} train + {self.eval} eval rows from "
                f"{self.name} ({where}{extra}){skipped}")

    def why_empty(self, spec: DataSpec, step: int) -> str:
        if self.weight == 0:
            return "its weight is 0"
        if self.share == 0:
            return f"its share under split_ratios {spec.split_ratios} is empty ({self.rows} rows in all)"
        if self.unusable:
            return f"none of its rows has what step {step} needs: {STEP_NEEDS[step]}"
        return "all of its rows of this step were held out for eval"


def _step_samples(spec: DataSpec, renderer: PromptRenderer, step: int, paths: list[str]):
    """Train and eval Samples of ``step`` from every source, validated, blended and capped."""
    ratios = spec.step_ratios()
    if ratios is not None and ratios[step - 1] == 0:
        raise DataError(f"DataSpec.split_ratios={spec.split_ratios!r} gives step {step} no data. Fix: give "
                        f"step {step} a positive share, e.g. '2,4,4'")
    weights = spec.weights or [1.0] * len(paths)
    rng = random.Random(f"fastrlhf-blend:{spec.seed}:{step}")
    train, evals, reports, unanswered = [], [], [], 0
    for path, weight in zip(paths, weights):
        source = read_source(path)
        parsed = parse_rows(source.train, source.name)                 # validates every row
        parsed_test = parse_rows(source.test, f"{source.name} (test split)") if source.test else None
        share = _share(len(parsed), ratios, spec.seed, step)
        if parsed_test is not None:
            train_idx, eval_src = share, (f"{source.name} (test split)", parsed_test)
            eval_idx = _share(len(parsed_test), ratios, spec.seed, step)
        else:
            n_eval = _eval_count(len(share), spec.eval_fraction)
            train_idx, eval_idx, eval_src = share[n_eval:], share[:n_eval], (source.name, parsed)
        if step == 1 and parsed_test is None:  # chat rows that end with a user turn: nothing to learn
            unanswered += sum(parsed[i].prompt_messages is not None and not parsed[i].answers for i in share)
        src_train = [s for s in _render(source.name, parsed, train_idx, renderer) if _usable(step, s)]
        src_eval = [s for s in _render(*eval_src, eval_idx, renderer) if _usable(step, s)]
        weighted = _weighted(src_train, weight, rng)
        train += weighted
        evals += src_eval
        unusable = len(train_idx) - len(src_train) + len(eval_idx) - len(src_eval)
        reports.append(_SourceReport(source.name, len(parsed), len(share), unusable, len(weighted), len(src_eval),
                                     weight, parsed_test is not None))
    if not train and unanswered:
        raise DataError(f"no training rows for step {step} in {paths}: each of its {unanswered} chat rows ends with a "
                        "user turn, so there is no assistant turn to learn (SFT learns the last assistant turn of "
                        "a conversation). Fix: end each conversation with the assistant's answer (rows without "
                        "one serve as step-3 prompts)")
    if not train:
        raise DataError(f"no training rows for step {step} in {paths}: it needs {STEP_NEEDS[step]}. Fix: add "
                        f"a dataset that has them, or set split_ratios so step {step} gets rows")
    rng.shuffle(train)
    rng.shuffle(evals)
    n_train, n_eval = len(train), len(evals)
    if spec.max_samples is not None:
        train = train[: spec.max_samples]
        evals = evals[: max(1, math.ceil(spec.max_samples * spec.eval_fraction))] if evals else evals
    _report(spec, step, reports, (n_train, n_eval), (len(train), len(evals)))
    _warn_eval_duplicates(step, train, evals, paths)
    return train, evals


def _warn_eval_duplicates(step: int, train: list, evals: list, paths: list) -> None:
    """Eval rows that are also training rows (a dataset that repeats rows) make the eval numbers
    measure memorisation: say how many (rank 0)."""
    from fastrlhf.utils.distributed import is_rank0
    seen = {(s.prompt, s.chosen, s.rejected) for s in train}
    n = sum((s.prompt, s.chosen, s.rejected) in seen for s in evals)
    if n and is_rank0():
        logger.warning(f"warning: data, step {step} ({STEP_NAMES[step]}): {n} of the {len(evals)} eval rows are "
                       f"also in the training rows ({', '.join(map(str, paths))} repeats rows): the eval numbers "
                       "partly measure memorisation; deduplicate the data")


def _report(spec: DataSpec, step: int, reports: list, before_cap: tuple, used: tuple) -> None:
    """One line per dataset (rank 0), a total for a blend or a cap, and a warning for each
    dataset of a blend that gives the step no training rows."""
    from fastrlhf.utils.distributed import is_rank0
    if not is_rank0():
        return
    for r in reports:
        logger.info(r.line(spec, step))
        if r.train == 0:
            logger.warning(f"warning: data, step {step} ({STEP_NAMES[step]}): {r.name} contributes no training "
                           f"rows: {r.why_empty(spec, step)}")
    if used != before_cap:
        logger.info(f"data, step {step} ({STEP_NAMES[step]}): {used[0]} train + {used[1]} eval rows used "
                    f"(max_samples={spec.max_samples} of {before_cap[0]} + {before_cap[1]})")
    elif len(reports) > 1:
        logger.info(f"data, step {step} ({STEP_NAMES[step]}): {used[0]} train + {used[1]} eval rows in all")


def build_datasets(spec: DataSpec, tokenizer, step: int) -> tuple[TokenizedDataset, TokenizedDataset]:
    """(train, eval) datasets of ``step`` (1 SFT, 2 reward model, 3 PPO prompts); see fastrlhf.data."""
    if step not in (1, 2, 3):
        raise ValueError(f"step must be 1 (SFT), 2 (reward model) or 3 (PPO), got {step!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, which every answer ends with. Fix: set "
                        "tokenizer.eos_token before building the datasets")
    if spec.paths:
        paths = spec.paths
    else:
        from fastrlhf.tasks.default_task import default_data_path
        paths = [default_data_path()]
    cache = _cache_path(spec, tokenizer, step, paths)
    if cache and os.path.exists(cache):
        saved = torch.load(cache, weights_only=True)
        logger.info(f"data, step {step} ({STEP_NAMES[step]}): {len(saved['train']['items'])} train + "
                    f"{len(saved['eval']['items'])} eval rows from the cache {cache}")
        return tuple(TokenizedDataset(step, saved[p]["items"], saved[p]["stats"]) for p in ("train", "eval"))
    train, evals = _step_samples(spec, PromptRenderer(tokenizer), step, paths)
    encoder = StepTokenizer(tokenizer, spec.max_prompt_len, spec.max_answer_len, spec.overlong,
                            spec.train_on_prompt)
    parts = {}
    for name, samples in (("train", train), ("eval", evals)):
        items, stats = encoder.encode(step, samples)
        log_stats(step, name, stats, spec.overlong)
        parts[name] = {"items": items, "stats": stats}
    if not parts["train"]["items"]:
        raise DataError(f"every step-{step} training row was over the length limits "
                        f"(max_prompt_len={spec.max_prompt_len}, max_answer_len={spec.max_answer_len}). "
                        f"Fix: raise the limits or use overlong='truncate'")
    if cache:
        os.makedirs(spec.cache_dir, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        torch.save(parts, tmp)
        os.replace(tmp, cache)       # atomic, so ranks building the same cache never see half a file
    return tuple(TokenizedDataset(step, parts[p]["items"], parts[p]["stats"]) for p in ("train", "eval"))
