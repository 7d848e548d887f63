"""Data for the three RLHF steps: read, validate, split, blend, tokenize, cache, collate.

    from fastrlhf.data import DataSpec, build_datasets, SFTCollator, PairCollator, PromptCollator
    spec = DataSpec(paths=["my.jsonl", "org/hub-dataset"], split_ratios="2,4,4")
    train_ds, eval_ds = build_datasets(spec, tokenizer, step)      # step 1, 2 or 3

DataSpec fields (all optional):
    paths           HF hub names (via datasets.load_dataset), local .json/.jsonl/.parquet files or
                    datasets.save_to_disk folders; [] = the bundled default task
                    (fastrlhf.tasks.default_task).
    weights         one per path: the fraction of that dataset's rows to use in the blend
                    (1.0 = all, 0.5 = a seeded half, 2.0 = every row twice); None = all of each.
    split_ratios    None: each step gets all rows of every dataset (a step run alone: `fastrlhf
                    sft`, `rm`, `ppo`, `dpo`, the Python API). "2,4,4": each dataset is cut by one
                    seeded permutation into disjoint shares for steps 1, 2, 3 (same seed -> same
                    parts, whichever step is built); `fastrlhf train` uses 2,4,4 unless told otherwise.
    eval_fraction   0.05 of each step's share held out for eval; a dataset with a test/validation
                    split uses that split's share instead.
    seed            1234; drives the split, the held-out rows, the blend and the caps.
    cache_dir       None; when set, the tokenized parts are cached there, keyed by a hash of the
                    spec, the data files (path, size, mtime) and the tokenizer.
    max_prompt_len, max_answer_len   128 tokens each (the answer's limit includes its EOS).
    overlong        "drop" (default) or "truncate": prompts are cut from the left (a leading BOS
                    kept), answers from the right (losing the EOS). Counts are logged on the
                    "fastrlhf.data" logger and kept in ``dataset.stats``.
    train_on_prompt False; True puts the SFT loss on the whole text (DeepSpeed-Chat style).
    max_samples     None; caps each step's train rows (eval rows at ceil(max_samples*eval_fraction)).

Items (torch Datasets; values are LongTensors unless noted):
    step 1  {"input_ids", "labels"}: prompt + answer + EOS; labels -100 on the prompt tokens
            unless train_on_prompt.
    step 2  {"chosen_input_ids", "rejected_input_ids"}: prompt + answer + EOS each.
    step 3  {"prompt_input_ids", "prompt": str, "columns": dict}: the rendered prompt text (e.g. for
            fastrlhf.tasks.default_task.ground_truth_score(prompt, response)) and the row's other
            columns (e.g. "answer"), which reward functions receive as keyword arguments; and
            "prompt_messages" (the prompt as [{"role", "content"}] messages, absent for a prompt
            given already rendered), which multi-turn rollouts render again with tools.

Collators (pad_token_id must not be None):
    SFTCollator(pad)(items)    -> {"input_ids", "attention_mask", "labels"}, right-padded, labels with -100
    PairCollator(pad)(items)   -> {"input_ids": [2B, S], "attention_mask"}: B chosen rows, then B rejected
    PromptCollator(pad)(items) -> {"input_ids", "attention_mask"} LEFT-padded, plus "prompt": list[str]
                                  and "columns": {name: [value per item]} (and "prompt_messages":
                                  [messages or None per item] when the items have them)

Formats, prompt rendering and the plain "Human: ...\\n\\nAssistant:" template used when the
tokenizer has no chat template are described in fastrlhf.data.formats. Steps that need pairs use
the rows that have them; SFT uses prompt + chosen (or response); PPO uses the prompts. Bad data
(missing columns or values, empty text, wrong types, unreadable files) raises DataError (a
ValueError) before any training, naming the file, row and column, and the fix. What each
dataset gives a step (rows, share, rows skipped) is logged on "fastrlhf.data"; a dataset of a
blend that gives the step no training rows is a warning naming the reason (a blend may mix
prompt-only data for PPO with pairs, so it is not an error; no rows from all of them is).
A UTF-8 byte-order mark at the start of a .json/.jsonl file is accepted.
"""
from fastrlhf.data.build import build_datasets, split_indices
from fastrlhf.data.collators import PairCollator, PromptCollator, SFTCollator, pad_sequences
from fastrlhf.data.encoding import IGNORE_INDEX, TokenizedDataset
from fastrlhf.errors import DataError
from fastrlhf.data.spec import DataSpec

__all__ = ["DataSpec", "DataError", "build_datasets", "split_indices", "SFTCollator", "PairCollator",
           "PromptCollator", "pad_sequences", "TokenizedDataset", "IGNORE_INDEX"]
