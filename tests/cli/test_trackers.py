"""`--report_to`: every metric that goes to metrics.jsonl goes to each tracker, with the run's
config, from rank 0 only; wandb in offline mode and mlflow on a local file store, no network.

wandb and mlflow are optional extras, also in the `test` extra, so the suite (and CI) logs to the
real packages. Where one is not installed, the same tests assert the one-line error naming the
install command instead: they never skip. `hidden` makes a package look uninstalled, so the error
is tested everywhere too."""
import importlib.util
import json
import math
import os
import struct
import sys

import pytest

from conftest import run_cli

TINY = ["--data.max_samples", "32", "--micro_batch_size", "8", "--eval_max_batches", "1", "--log_steps", "1",
        "--max_steps", "3", "--eval_steps", "2"]


def run(argv, capsys, monkeypatch):
    monkeypatch.setenv("FASTRLHF_NO_PROGRESS", "1")
    return run_cli(argv, capsys)


def installed(package):
    return importlib.util.find_spec(package) is not None


def wandb_records(wandb_dir):
    """(config, history rows) of the one offline run under wandb_dir, read from its .wandb file (a
    LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = [os.path.join(root, f) for root, _, files in os.walk(wandb_dir) for f in files
               if f.endswith(".wandb") and "offline-run-" in root]
    data, pos, block, chunks, records = open(path, "rb").read(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(chunks)
            chunks = b""
    config, history = {}, []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return config, history


def as_points(rows):
    """{(step, metric): value} of metrics.jsonl-like rows (NaN as None, as metrics.jsonl writes it)."""
    out = {}
    for row in rows:
        step = row.get("step", row.get("_step"))
        for k, v in row.items():
            if k not in ("step",) and not k.startswith("_"):
                out[(int(step), k)] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return out


def test_every_metric_and_the_config_reach_wandb_offline_and_mlflow(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:" + str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "wandb").mkdir()
    out = str(tmp_path / "out")
    rc, _, err = run(["sft", *TINY, "--learning_rate", "2e-3", "--report_to", "tensorboard", "wandb", "mlflow",
                      "--output_dir", out], capsys, monkeypatch)
    missing = [p for p in ("wandb", "mlflow") if not installed(p)]
    if missing:  # the extra is not installed here: the run is refused before anything loads
        assert rc == 2 and f'pip install -e ".[{missing[0]}]"' in err.strip().splitlines()[-1], err
        return
    assert rc == 0, err[-3000:]
    jsonl = [json.loads(line) for line in open(os.path.join(out, "tensorboard", "metrics.jsonl"))]
    expected = as_points(jsonl)
    assert {k for _, k in expected} >= {"train/loss", "eval/loss"} and len({s for s, _ in expected}) >= 3

    config, history = wandb_records(tmp_path / "wandb")
    assert as_points(history) == pytest.approx(expected)
    assert config["learning_rate"] == 2e-3 and config["data"]["max_samples"] == 32

    from mlflow import MlflowClient
    client = MlflowClient("file:" + str(tmp_path / "mlruns"))
    (exp,) = [e for e in client.search_experiments() if e.name == "fastrlhf"]
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.run_name == "out" and mlrun.info.status == "FINISHED"
    got = {(m.step, key): m.value for key in mlrun.data.metrics for m in client.get_metric_history(mlrun.info.run_id, key)}
    assert got == pytest.approx({k: v for k, v in expected.items() if v is not None})
    assert mlrun.data.params["learning_rate"] == "0.002" and mlrun.data.params["data.max_samples"] == "32"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))


@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_line_naming_the_install_command(tmp_path, capsys, monkeypatch,
                                                                                  package):
    monkeypatch.setitem(sys.modules, package, None)  # hidden: import fails, find_spec finds nothing
    rc, _, err = run(["sft", *TINY, "--report_to", "tensorboard", package, "--output_dir", str(tmp_path / "o")],
                     capsys, monkeypatch)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert f"--report_to {package}: the {package} package is not installed" in line
    assert f'pip install -e ".[{package}]"' in line
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written


def test_report_to_names_are_checked_and_none_means_metrics_jsonl_only(tmp_path, monkeypatch):
    from fastrlhf.errors import ConfigError
    from fastrlhf.options import config_from_dict
    from fastrlhf.rlhf.configs import SFTConfig
    from fastrlhf.utils import logging as fl_logging
    with pytest.raises(ConfigError, match="--report_to 'comet' is not a tracker; choose from tensorboard, wandb, "
                                          "mlflow, none"):
        config_from_dict(SFTConfig, {"report_to": ["comet"]})
    with pytest.raises(ConfigError, match="'none' means no tracker"):
        config_from_dict(SFTConfig, {"report_to": ["none", "wandb"]})
    assert config_from_dict(SFTConfig, {}).report_to == ["tensorboard"]
    logger = fl_logging.MetricsLogger(str(tmp_path / "tb"), ["none"])
    logger.log({"train/loss": 1.0}, 1)
    logger.close()
    assert os.listdir(tmp_path / "tb") == ["metrics.jsonl"]
    # rank 1 opens no tracker (and writes nothing)
    monkeypatch.setattr(fl_logging, "is_rank0", lambda: False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # a tracker start would fail loudly
    logger = fl_logging.MetricsLogger(str(tmp_path / "tb1"), ["wandb"])
    logger.log({"train/loss": 1.0}, 1)
    logger.close()
    assert not (tmp_path / "tb1").exists()
