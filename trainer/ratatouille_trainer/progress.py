"""Live progress: one-line JSON events on stdout (the local executor parses them for its
display) and, when ``RATATOUILLE_METRICS_PORT`` is set, Prometheus gauges served on that port
while the member trains (a PodMonitor scrapes them; no Pushgateway)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO

EVENT = "progress"


def _num(v: Any) -> Any:
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return round(v, 6)
    return v


class Progress:
    def __init__(self, stage: str, member: str, steps: int, *, every: int | None = None,
                 stream: TextIO | None = None, port: int | None = None):
        self.stage = stage
        self.member = member
        self.steps = int(steps)
        env_every = os.environ.get("RATATOUILLE_PROGRESS_EVERY")
        self.every = max(1, int(every if every is not None else (env_every or 10)))
        self.stream = stream or sys.stdout
        self.gauges = None
        if port is None and os.environ.get("RATATOUILLE_METRICS_PORT"):
            port = int(os.environ["RATATOUILLE_METRICS_PORT"])
        if port:
            self._serve(port)
        self.last_val: float | None = None

    def _serve(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        reg = CollectorRegistry()
        self.gauges = {
            "step": Gauge("ratatouille_trainer_step", "Training steps done", registry=reg),
            "steps": Gauge("ratatouille_trainer_steps_total", "Training steps planned", registry=reg),
            "loss": Gauge("ratatouille_trainer_loss", "Training loss (mean since the last report)", registry=reg),
            "ips": Gauge("ratatouille_trainer_images_per_second", "Training throughput", registry=reg),
            "val": Gauge("ratatouille_trainer_val_accuracy", "Latest training-domain validation accuracy", registry=reg),
            "info": Gauge("ratatouille_trainer_info", "Stage and member of this trainer", ["stage", "member"], registry=reg),
        }
        self.gauges["info"].labels(stage=self.stage, member=self.member).set(1)
        self.gauges["steps"].set(self.steps)
        start_http_server(port, addr=os.environ.get("RATATOUILLE_METRICS_ADDR", "0.0.0.0"), registry=reg)

    def emit(self, event: str = EVENT, **fields: Any) -> None:
        body = {"event": event, "stage": self.stage, "member": self.member}
        body.update({k: _num(v) for k, v in fields.items()})
        try:
            self.stream.write(json.dumps(body, separators=(",", ":")) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def update(self, step: int, *, loss: float | None = None, val: float | None = None,
               images_per_second: float | None = None, force: bool = False) -> None:
        """``step`` counts steps done (1-based). Prints every ``every`` steps, on validation,
        and when forced; gauges are updated every call."""
        if val is not None:
            self.last_val = val
        if self.gauges is not None:
            self.gauges["step"].set(step)
            if loss is not None and math.isfinite(loss):
                self.gauges["loss"].set(loss)
            if images_per_second is not None:
                self.gauges["ips"].set(images_per_second)
            if self.last_val is not None:
                self.gauges["val"].set(self.last_val)
        if force or val is not None or step % self.every == 0 or step == self.steps:
            self.emit(step=step, steps=self.steps, loss=loss, valAccuracy=self.last_val,
                      imagesPerSecond=images_per_second, time=round(time.time(), 3))
