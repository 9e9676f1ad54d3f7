"""Trainer add-ons kept out of the training loop: early stopping on a validation metric and
MLflow logging. The Trainer calls them at a few clear places (each evaluation, each
metrics row, checkpoint save/load, the end of fit)."""

from __future__ import annotations

import math
import os
import time

__all__ = ["EarlyStopping", "MLflowLogger", "require_mlflow", "MLFLOW_EXTRA"]

MLFLOW_EXTRA = "pip install 'accelops[mlflow]'"


# --------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """Stops training when `monitor` (a key of the evaluation row: "val_loss", "val_bpc",
    or "val_<name>" for a named loss component) has not improved by more than `min_delta`
    for `patience` evaluations in a row. mode "min": lower is better; "max": higher.
    A non-finite value (NaN, inf) stops at once. Its counters are part of checkpoints."""

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min"):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"early_stopping monitor must be a metric name, got {monitor!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"early_stopping patience must be a positive int, got {patience!r}")
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, (int, float))
            or not min_delta >= 0
            or not math.isfinite(min_delta)
        ):
            raise ValueError(f"early_stopping min_delta must be a finite number >= 0, got {min_delta!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"early_stopping mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, float(min_delta), mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.stopped_step: int | None = None
        self.reason: str | None = None

    @classmethod
    def from_spec(cls, spec) -> "EarlyStopping | None":
        """None | EarlyStopping | dict of its arguments -> EarlyStopping or None."""
        if spec is None or spec is False:
            return None
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            known = {"monitor", "patience", "min_delta", "mode"}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"early_stopping has unknown key(s) {unknown}; known: {sorted(known)}")
            return cls(**spec)
        raise TypeError(
            f"early_stopping must be None, a dict {{'monitor', 'patience', 'min_delta', 'mode'}} or "
            f"an EarlyStopping, got {spec!r}"
        )

    @property
    def stopped(self) -> bool:
        return self.stopped_step is not None

    def update(self, metrics: dict, step: int) -> bool:
        """One evaluation's row -> True when training should stop now."""
        if self.monitor not in metrics or metrics[self.monitor] is None:
            raise ValueError(
                f"early_stopping monitors {self.monitor!r} but the evaluation reports "
                f"{sorted(k for k, v in metrics.items() if v is not None and k != 'step')}"
            )
        value = float(metrics[self.monitor])
        if not math.isfinite(value):
            self.stopped_step = step
            self.reason = f"early stopping at step {step}: {self.monitor} is {value}"
            return True
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.best_step, self.wait = value, step, 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_step = step
            self.reason = (
                f"early stopping at step {step}: {self.monitor} did not improve by more than "
                f"{self.min_delta:g} ({self.mode}) for {self.patience} evaluation(s); best "
                f"{self.best:.6g} at step {self.best_step}"
            )
            return True
        return False

    def state_dict(self) -> dict:
        return {
            "monitor": self.monitor,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "stopped_step": self.stopped_step,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict) -> None:
        # The counters come back; the settings stay as given now (a resumed run may change patience).
        self.best, self.best_step, self.wait = state["best"], state["best_step"], int(state["wait"])
        self.stopped_step, self.reason = state["stopped_step"], state["reason"]
        if (state["monitor"], state["mode"]) != (self.monitor, self.mode):
            self.best = self.best_step = None  # another metric: its history does not apply
            self.wait, self.stopped_step, self.reason = 0, None, None


# --------------------------------------------------------------------------- MLflow


def require_mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ImportError(
            f"MLflow logging needs the mlflow package, which is not installed ({exc}): {MLFLOW_EXTRA}"
        ) from None
    return MlflowClient


def _flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


class MLflowLogger:
    """Logs a run's parameters, per-step and per-evaluation metrics and its final
    checkpoint to MLflow through an MlflowClient (so a run the user has active with the
    fluent API is left alone). Rank 0 only: the Trainer makes one only there.

    spec: True, or a dict with tracking_uri (default: a SQLite store log_dir/mlflow.db
    with artifacts under log_dir/mlruns, MLflow 3 refusing plain file stores), experiment
    (default "accelops"), run_name, tags (dict) and log_checkpoint (False: the final
    checkpoint's path is a tag; True: also copied in as an artifact)."""

    KEYS = ("tracking_uri", "experiment", "run_name", "tags", "log_checkpoint")

    def __init__(self, spec, log_dir):
        client_cls = require_mlflow()
        spec = {} if spec is True else dict(spec)
        unknown = sorted(set(spec) - set(self.KEYS))
        if unknown:
            raise ValueError(f"mlflow has unknown key(s) {unknown}; known: {list(self.KEYS)}")
        self.tracking_uri = spec.get("tracking_uri")
        self.artifact_location = None
        if self.tracking_uri is None:
            if log_dir is None:
                raise ValueError(
                    "mlflow=True needs log_dir (the store goes to log_dir/mlflow.db) or mlflow={'tracking_uri': ...}"
                )
            root = os.path.abspath(log_dir)
            os.makedirs(root, exist_ok=True)
            self.tracking_uri = "sqlite:///" + os.path.join(root, "mlflow.db")
            self.artifact_location = "file:" + os.path.join(root, "mlruns")
        self.experiment = spec.get("experiment", "accelops")
        self.run_name = spec.get("run_name")
        self.tags = dict(spec.get("tags") or {})
        self.log_checkpoint = bool(spec.get("log_checkpoint", False))
        self._client_cls = client_cls
        self.client = None
        self.run_id: str | None = None

    def start(self, params: dict, resume_run_id: str | None = None) -> None:
        from mlflow.entities import Param

        self.client = self._client_cls(tracking_uri=self.tracking_uri)
        resume_run_id = self.run_id or resume_run_id  # fit() again on the same trainer: the same run
        if resume_run_id is not None:
            try:
                self.client.get_run(resume_run_id)
                self.run_id = resume_run_id
                self.client.update_run(resume_run_id, status="RUNNING")
                return  # its params are there already
            except Exception:  # noqa: BLE001 - another store, or the run was deleted: start a new one
                pass
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        )
        run = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        flat = [Param(k, str(v)[:6000]) for k, v in _flatten(params).items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_rows(self, rows) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, int(row["step"]))
            for row in rows
            for k, v in row.items()
            if k not in ("step", "epoch") and v is not None and v != ""
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, checkpoint_path: str | None, status: str = "FINISHED", tags: dict | None = None) -> None:
        if self.run_id is None:
            return
        for key, value in (tags or {}).items():
            if value is not None:
                self.client.set_tag(self.run_id, key, str(value))
        if checkpoint_path is not None:
            self.client.set_tag(self.run_id, "accelops.checkpoint", os.path.abspath(checkpoint_path))
            if self.log_checkpoint:
                # fsdp / pipeline checkpoints are directories (accelops.train.checkpoint.sharded)
                log = self.client.log_artifacts if os.path.isdir(checkpoint_path) else self.client.log_artifact
                log(self.run_id, checkpoint_path, artifact_path="checkpoints")
        self.client.set_terminated(self.run_id, status=status)
