"""Training progress on the driver: one line per logged step (step / total, loss, s/step, ETA).

Workers log their metrics to the MLflow run; the driver reads them back while ``trainer.fit()``
blocks. Reading the tracking store, not worker stdout, works wherever the run is tracked (local
sqlite, a server) and whatever ``log_to_driver`` says, for ``ray job submit`` and the demo alike.
"""

from __future__ import annotations

import threading
from typing import Callable

from mlflow.tracking import MlflowClient


def progress_line(step: int, total: int, loss: float, seconds_per_step: float | None) -> str:
    """``"train step 40/80 (50 %): loss 1.234, 12.3 s/step, ETA 8m12s"``."""
    line = f"train step {step}/{total} ({100 * step // max(total, 1)} %): loss {loss:.3f}"
    if seconds_per_step is not None:
        eta = round(max(total - step, 0) * seconds_per_step)
        line += f", {seconds_per_step:.1f} s/step, ETA {eta // 60}m{eta % 60:02d}s"
    return line


class TrainingProgress:
    """Polls the run's ``loss`` history every ``interval`` seconds and prints each new step once
    (a step logged again after a resume prints again: the line shows the job going back)."""

    def __init__(self, tracking_uri: str, run_id: str, total_steps: int, interval: float = 5.0,
                 emit: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id, self.total, self.interval, self.emit = run_id, total_steps, interval, emit
        self.seen: set[tuple[int, int]] = set()  # (step, timestamp) already printed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-progress", daemon=True)

    def __enter__(self) -> "TrainingProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the steps logged since the last poll

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a busy store is no reason to stop the job; the next poll retries
                continue

    def poll(self) -> None:
        history = sorted(self.client.get_metric_history(self.run_id, "loss"), key=lambda m: (m.timestamp, m.step))
        for previous, metric in zip([None, *history], history):
            if (metric.step, metric.timestamp) in self.seen:
                continue
            self.seen.add((metric.step, metric.timestamp))
            rate = None
            if previous is not None and metric.step > previous.step:
                rate = (metric.timestamp - previous.timestamp) / 1000 / (metric.step - previous.step)
            self.emit(progress_line(metric.step, self.total, metric.value, rate))
