"""The Trainer's metrics files in its log_dir: metrics.csv, and TensorBoard events when
tensorboard is installed. Rank 0 writes them; a resumed run continues them from the step
of its checkpoint."""

from __future__ import annotations

import csv
import logging
import os

__all__ = ["MetricsFiles", "CSV_FIELDS"]

log = logging.getLogger("accelops.train")

CSV_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "val_loss", "val_bpc")


class MetricsFiles:
    """Opens log_dir's metrics.csv (and a TensorBoard writer) for a run that starts after
    `step`: rows past it, written after the checkpoint it resumes from (a crash followed), are
    dropped, as the resumed run writes them again. write(rows) appends rows (dicts with a
    "step"; a key first seen adds a column), close() closes both files."""

    def __init__(self, log_dir: str, step: int):
        self.log_dir = log_dir
        self._csv = self._tb = None
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "metrics.csv")
        kept = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                kept = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= step]
                extra = [k for k in reader.fieldnames or () if k not in CSV_FIELDS]
        self._csv_rewrite(path, list(CSV_FIELDS) + (extra if kept else []), kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        try:
            self._tb = SummaryWriter(log_dir, purge_step=step + 1)
        except BaseException:
            self.close(quiet=True)
            raise

    def _csv_rewrite(self, path, fields, rows) -> None:
        self._csv_file = open(path, "w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=fields, extrasaction="ignore")
        self._csv.writeheader()
        self._csv.writerows(rows)
        self._csv_file.flush()

    def write(self, rows) -> None:
        if self._csv is not None:
            new = list(dict.fromkeys(k for row in rows for k in row if k not in self._csv.fieldnames))
            if new:  # a column first seen now (per-group lr, named losses): rewrite the file with it
                path = self._csv_file.name
                self._csv_file.close()
                with open(path, newline="") as f:
                    old = list(csv.DictReader(f))
                self._csv_rewrite(path, list(self._csv.fieldnames) + new, old)
            self._csv.writerows(rows)
            self._csv_file.flush()
        if self._tb is not None:
            for row in rows:
                for key, value in row.items():
                    if key not in ("step", "epoch") and value is not None:
                        self._tb.add_scalar(
                            f"train/{key}" if not key.startswith("val") else f"val/{key}", value, row["step"]
                        )

    def close(self, quiet: bool = False) -> None:
        """Closes the files (both, even when the first fails; a second call does nothing).
        quiet: an error is already on its way (or the files are known broken), so what closing
        them raises is logged, not raised over it."""
        handles = []
        if self._csv is not None:
            handles.append(self._csv_file)
        if self._tb is not None:
            handles.append(self._tb)
        self._csv = self._tb = None
        first = None
        for handle in handles:
            try:
                handle.close()
            except Exception as exc:  # noqa: BLE001 - raised below unless quiet
                if quiet:
                    log.warning("closing the metrics in %r failed as well: %s", self.log_dir, exc)
                elif first is None:
                    first = exc
        if first is not None:
            raise first
