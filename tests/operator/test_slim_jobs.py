"""The operator keeps a slim view of its child Jobs (issue 12, "memory bounded per run whatever
the spec says"): a Job's pod template can be hundreds of KB (job description, pod annotations,
tolerations) and is never read back, so neither the kopf index nor a LIST keeps it; LISTs are
paged so that only one page of full bodies is in memory at a time."""
from __future__ import annotations

import json
from types import SimpleNamespace

from ratatouille_operator import manifests as M
from ratatouille_operator.reconciler import JOB_LIST_PAGE, list_slim_jobs
from tests.operator.test_manifests import RUN, first_create, make_spec


def _big_job(status: dict | None = None) -> dict:
    spec = make_spec(template={"podAnnotations": {f"example.com/a{i}": "x" * 1024 for i in range(32)},
                               "tolerations": [{"key": f"k{i}", "operator": "Exists"} for i in range(64)]})
    job = M.render_job(RUN, spec, first_create(spec), default_image="img")
    job["metadata"].update(uid="u-1", creationTimestamp="2026-12-03T10:00:00Z",
                           annotations={**job["metadata"]["annotations"], "ratatouille.dev/held": "true",
                                        "example.com/other": "y" * 5000},
                           labels={**job["metadata"]["labels"], "kueue.x-k8s.io/queue-name": "q"})
    job["spec"]["suspend"] = True
    job["status"] = status or {"startTime": "2026-12-03T10:00:01Z", "active": 1, "ready": 0}
    return job


def test_the_slim_view_drops_the_pod_template_and_reads_back_the_same():
    job = _big_job()
    slim = M.slim_job(job)
    assert len(json.dumps(job)) > 40_000 and len(json.dumps(slim)) < 2_000
    assert "template" not in slim["spec"] and "example.com/other" not in slim["metadata"]["annotations"]
    assert M.parse_job(slim) == M.parse_job(job)
    observed = M.parse_job(slim)
    assert observed.held and observed.queued and observed.state == "Suspended"
    done = _big_job({"conditions": [{"type": "Complete", "status": "True"}], "completionTime": "2026-12-03T10:05:00Z"})
    assert M.parse_job(M.slim_job(done)) == M.parse_job(done)


def test_a_list_is_read_page_by_page_and_slimmed():
    jobs = [_big_job() for _ in range(2 * JOB_LIST_PAGE + 5)]
    calls = []

    def list_fn(namespace, *, label_selector, limit, _preload_content, _continue=None):
        calls.append((namespace, label_selector, limit, _continue))
        start = int(_continue or 0)
        page = jobs[start:start + limit]
        more = start + limit < len(jobs)
        return SimpleNamespace(data=json.dumps({"items": page, "metadata": {"continue": str(start + limit) if more else ""}}))

    got = list_slim_jobs(list_fn, "ns", label_selector="ratatouille.dev/run=r")
    assert len(got) == len(jobs) and all("template" not in j["spec"] for j in got)
    assert [c[3] for c in calls] == [None, str(JOB_LIST_PAGE), str(2 * JOB_LIST_PAGE)]
    assert all(c[:3] == ("ns", "ratatouille.dev/run=r", JOB_LIST_PAGE) for c in calls)


def test_what_the_operator_remembers_of_storage_is_bounded():
    from ratatouille_operator.reconciler import StorageView

    reads = []

    class Store:
        def read_json(self, key):
            reads.append(key)
            return {"valAccuracy": 0.5}

    view = StorageView(lambda uri, endpoint: Store())
    n = StorageView.MAX_PREFIXES + 50
    for i in range(n):
        assert view.metrics(f"s3://b/runs/m{i}", None) == {"valAccuracy": 0.5}
    assert len(view._metrics) == StorageView.MAX_PREFIXES
    reads.clear()
    view.metrics(f"s3://b/runs/m{n - 1}", None)
    assert reads == []  # the most recent are still remembered
    view.metrics("s3://b/runs/m0", None)
    assert reads == ["s3://b/runs/m0/metrics.json"]  # the oldest was forgotten, and is read again
