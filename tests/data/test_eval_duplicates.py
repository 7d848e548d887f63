"""A dataset whose rows repeat puts copies of training rows in the eval split: the eval loss then
measures memorisation. The build says so, with the count."""
import json
import logging

from fastrlhf.data import DataSpec, build_datasets
from fastrlhf.models.loading import load_tokenizer


def test_eval_rows_that_duplicate_training_rows_are_counted_in_a_warning(tmp_path, caplog):
    rows = [{"prompt": f"Human: say {w}\n\nAssistant:", "chosen": f" {w} {w}", "rejected": f" no {w}"}
            for w in ("red", "green", "blue", "gold", "teal", "pink", "gray", "plum", "sand", "moss")]
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))   # every row 4 times
    unique = tmp_path / "unique.jsonl"
    unique.write_text("".join(json.dumps(r) + "\n" for r in rows * 1))
    tok = load_tokenizer(None)
    caplog.set_level(logging.INFO, logger="fastrlhf.data")
    # the "fastrlhf" logger stops propagation once get_logger() has set it up: listen on the data logger
    data_logger = logging.getLogger("fastrlhf.data")
    data_logger.addHandler(caplog.handler)
    try:
        _check(repeated, unique, tok, caplog)
    finally:
        data_logger.removeHandler(caplog.handler)


def _check(repeated, unique, tok, caplog):
    for step in (1, 2):
        caplog.clear()
        train, evals = build_datasets(DataSpec(paths=[str(repeated)], eval_fraction=0.25), tok, step)
        # a set: the record reaches caplog once or twice (through the root logger too, unless "fastrlhf" stops it)
        warnings = sorted({r.getMessage() for r in caplog.records if "also in the training rows" in r.getMessage()})
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        assert f"data, step {step}" in warnings[0] and f"of the {len(evals)} eval rows are also in the training " \
            "rows" in warnings[0] and str(repeated) in warnings[0]
        n = int(warnings[0].split(" of the ")[0].rsplit(" ", 1)[-1])
        assert 0 < n <= len(evals)
    caplog.clear()
    build_datasets(DataSpec(paths=[str(unique)], eval_fraction=0.25), tok, 1)
    assert not [r for r in caplog.records if "also in the training rows" in r.getMessage()]
