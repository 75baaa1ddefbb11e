"""Prometheus metrics of the operator (docs/contract.md, "Metrics").

Every metric lives on a dedicated ``CollectorRegistry`` held by :class:`OperatorMetrics`, so tests
can build as many independent instances as they like and nothing touches prometheus_client's
process-wide default registry. Labels are bounded: namespace, stage, phase, state, result,
handler, op, version; never run or member names.

The chart's PrometheusRule and Grafana dashboard (charts/ratatouille) query exactly these names;
``tests/chart/test_rules.py`` checks that every name they reference is defined here or in
:data:`TRAINER_METRICS`.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

__all__ = [
    "CHILD_JOB_STATES",
    "OPERATOR_METRICS",
    "OperatorMetrics",
    "RESULTS",
    "TRAINER_METRICS",
    "start_http_server",
]

#: Values of the ``state`` label of ``ratatouille_child_jobs`` (planner.ObservedJob states).
CHILD_JOB_STATES = ("Active", "Pending", "Succeeded", "Failed", "Suspended")
#: Values of the ``result`` label of ``ratatouille_runs_finished_total`` and the run histogram.
RESULTS = ("Succeeded", "Failed")

#: Gauges each training pod serves on its ``metrics`` container port (ratatouille_trainer.progress).
TRAINER_METRICS = (
    "ratatouille_trainer_step",
    "ratatouille_trainer_loss",
    "ratatouille_trainer_images_per_second",
    "ratatouille_trainer_val_accuracy",
    "ratatouille_trainer_info",
)

# Training stages run for minutes to hours; reconciles take milliseconds to seconds.
_STAGE_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
_RUN_BUCKETS = (60, 300, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400, 172800)
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: name (as exposed, without the _total/_bucket suffixes) -> (type, label names)
OPERATOR_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ratatouille_build_info": ("gauge", ("version",)),
    "ratatouille_runs": ("gauge", ("namespace", "phase")),
    "ratatouille_runs_created_total": ("counter", ("namespace",)),
    "ratatouille_runs_finished_total": ("counter", ("namespace", "result")),
    "ratatouille_run_duration_seconds": ("histogram", ("result",)),
    "ratatouille_child_jobs": ("gauge", ("namespace", "stage", "state")),
    "ratatouille_child_jobs_created_total": ("counter", ("namespace", "stage")),
    "ratatouille_child_job_failures_total": ("counter", ("namespace", "stage")),
    "ratatouille_child_job_retries_total": ("counter", ("namespace", "stage")),
    "ratatouille_stage_duration_seconds": ("histogram", ("stage",)),
    "ratatouille_reconcile_duration_seconds": ("histogram", ("handler",)),
    "ratatouille_reconcile_errors_total": ("counter", ("handler",)),
    "ratatouille_oldest_pending_run_age_seconds": ("gauge", ()),
    "ratatouille_storage_errors_total": ("counter", ("op",)),
    "ratatouille_averaging_collapse_total": ("counter", ("namespace",)),
}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("ratatouille")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


class OperatorMetrics:
    """The operator's metrics on their own registry.

    ``registry`` defaults to a fresh ``CollectorRegistry``; pass one to share it with other
    collectors. ``version`` sets ``ratatouille_build_info{version}`` (default: the installed
    package version).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.build_info = Gauge(
            "ratatouille_build_info", "Operator build information (always 1)", ["version"], registry=reg)
        self.runs = Gauge(
            "ratatouille_runs", "RatatouilleRuns currently known, by phase", ["namespace", "phase"],
            registry=reg)
        # prometheus_client appends _total to counters; declare them without it.
        self.runs_created = Counter(
            "ratatouille_runs_created", "RatatouilleRuns seen for the first time", ["namespace"],
            registry=reg)
        self.runs_finished = Counter(
            "ratatouille_runs_finished", "RatatouilleRuns that reached a terminal phase",
            ["namespace", "result"], registry=reg)
        self.run_duration = Histogram(
            "ratatouille_run_duration_seconds", "Wall time from run creation to its terminal phase",
            ["result"], buckets=_RUN_BUCKETS, registry=reg)
        self.child_jobs = Gauge(
            "ratatouille_child_jobs", "Child Jobs currently present, by stage and state",
            ["namespace", "stage", "state"], registry=reg)
        self.child_jobs_created = Counter(
            "ratatouille_child_jobs_created", "Child Jobs created", ["namespace", "stage"], registry=reg)
        self.child_job_failures = Counter(
            "ratatouille_child_job_failures", "Child Jobs observed Failed", ["namespace", "stage"],
            registry=reg)
        self.child_job_retries = Counter(
            "ratatouille_child_job_retries", "Child Jobs re-created as a further attempt",
            ["namespace", "stage"], registry=reg)
        self.stage_duration = Histogram(
            "ratatouille_stage_duration_seconds", "Duration of finished child Jobs, by stage",
            ["stage"], buckets=_STAGE_BUCKETS, registry=reg)
        self.reconcile_duration = Histogram(
            "ratatouille_reconcile_duration_seconds", "Duration of one handler invocation",
            ["handler"], buckets=_RECONCILE_BUCKETS, registry=reg)
        self.reconcile_errors = Counter(
            "ratatouille_reconcile_errors", "Handler invocations that raised", ["handler"], registry=reg)
        self.oldest_pending_run_age = Gauge(
            "ratatouille_oldest_pending_run_age_seconds",
            "Age of the oldest run still in phase Pending (0 when there is none)", registry=reg)
        self.storage_errors = Counter(
            "ratatouille_storage_errors", "Failed object-storage operations", ["op"], registry=reg)
        self.averaging_collapse = Counter(
            "ratatouille_averaging_collapse",
            "Averages whose accuracy fell far below the best single member", ["namespace"],
            registry=reg)
        self.build_info.labels(version=version or _version()).set(1)

    def names(self) -> set[str]:
        """Every series name this registry exposes or will expose once its labelled children exist:
        family names plus ``_total`` for counters and ``_bucket``/``_count``/``_sum`` for
        histograms (and their ``_created`` companions)."""
        suffixes = {"counter": ("_total", "_created"),
                    "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "gauge": ("",), "info": ("_info",)}
        out: set[str] = set()
        for family in self.registry.collect():
            for suffix in suffixes.get(family.type, ("",)):
                out.add(family.name + suffix)
            out.update(sample.name for sample in family.samples)
        return out


def start_http_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0"):
    """Serve ``registry`` at http://addr:port/metrics in a daemon thread; returns (server, thread)."""
    return _start_http_server(port, addr=addr, registry=registry)
