"""Experiment trackers behind `--report_to` (HF's convention): `tensorboard` (the default, installed
with fastrlhf), `wandb`, `mlflow` (optional extras: `pip install -e ".[wandb]"`, `".[mlflow]"`),
several at once, or `none`. `MetricsLogger` (utils/logging.py) sends every metric it writes to
metrics.jsonl to each tracker too, from rank 0 only; a tracker's run gets the run's config.

- wandb: `wandb.init(project=$WANDB_PROJECT or "fastrlhf", name=<output_dir's name>, config=...)`;
  `WANDB_MODE=offline` logs without network (`wandb sync` later), as wandb documents.
- mlflow: the tracking URI is $MLFLOW_TRACKING_URI, else a file store at <output_dir>/mlruns (no
  server, no database; `mlflow ui --backend-store-uri <output_dir>/mlruns`); the experiment is
  $MLFLOW_EXPERIMENT_NAME or "fastrlhf"; the config goes in as params (nested keys dotted).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ConfigError

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
REPORT_TO_CHOICES = tuple(TRACKER_PACKAGES) + ("none",)
# what `pip install` brings each one in (setup.py's extras)
INSTALL = {"tensorboard": 'pip install tensorboard', "wandb": 'pip install -e ".[wandb]" (or pip install wandb)',
           "mlflow": 'pip install -e ".[mlflow]" (or pip install mlflow-skinny)'}


def check_report_to(report_to: Sequence[str], installed: bool = False) -> None:
    """Known names, `none` alone; with `installed`, each tracker's package importable here."""
    names = list(report_to)
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ConfigError(f"--report_to {unknown[0]!r} is not a tracker; choose from {', '.join(REPORT_TO_CHOICES)} "
                          "(several allowed, e.g. --report_to tensorboard wandb)")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"--report_to {' '.join(names)}: 'none' means no tracker, so it cannot be combined "
                          "with others")
    if installed:
        for name in names:
            if name != "none" and importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
                raise ConfigError(f"--report_to {name}: the {TRACKER_PACKAGES[name]} package is not installed; "
                                  f"install it with {INSTALL[name]}, or drop {name} from --report_to")


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


class TensorboardTracker:
    def __init__(self, log_dir: str, resumed_at: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: tensorboard hides the events a killed run logged after the checkpoint
        self.writer = SummaryWriter(log_dir, purge_step=None if resumed_at is None else resumed_at + 1)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    def __init__(self, config: Dict[str, Any], run_name: str, output_dir: str):
        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastrlhf"), name=run_name, config=config,
                              dir=os.environ.get("WANDB_DIR") or output_dir)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, config: Dict[str, Any], run_name: str, output_dir: str):
        import mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store in the run's dir; mlflow >= 3.7 wants this opt-in for file stores
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file:" + os.path.abspath(os.path.join(output_dir, "mlruns"))
        self.client = mlflow.MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fastrlhf")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        from mlflow.entities import Param
        params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # mlflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: Dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(report_to: Sequence[str], log_dir: str, resumed_at: Optional[int],
                  config: Optional[Dict[str, Any]], output_dir: Optional[str]) -> List[Any]:
    """The trackers of `report_to` (rank 0 calls this); a tracker that fails to start is a ConfigError
    naming it and what it said (a tracking server that refuses, a bad URI), not a traceback."""
    out_dir = output_dir or log_dir
    run_name = os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
    trackers: List[Any] = []
    for name in report_to:
        try:
            if name == "tensorboard":
                trackers.append(TensorboardTracker(log_dir, resumed_at))
            elif name == "wandb":
                trackers.append(WandbTracker(config or {}, run_name, out_dir))
            elif name == "mlflow":
                trackers.append(MLflowTracker(config or {}, run_name, out_dir))
        except ImportError:
            raise ConfigError(f"--report_to {name}: the {TRACKER_PACKAGES[name]} package is not installed; install "
                              f"it with {INSTALL[name]}") from None
        except Exception as e:  # the tracker's own error: one line, naming it
            message = " ".join(str(e).split())[:300]
            raise ConfigError(f"--report_to {name}: it could not start a run ({type(e).__name__}: {message})") from None
    return trackers
