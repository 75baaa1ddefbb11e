"""The Kubernetes API emulator (kmock 0.8 + shims) against the real clients that will use it:
the kubernetes Python client, kubectl, and a kopf operator run with KopfRunner."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import textwrap
import threading
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

kubernetes = pytest.importorskip("kubernetes")
pytest.importorskip("kmock")

from ratatouille_operator.emulator import ApiRequest, Emulator, serve_forever  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROJECT_CRD = REPO / "crds" / "ratatouilleruns.ratatouille.dev.yaml"
RUNS = "ratatouille.dev/v1alpha1/ratatouilleruns"
JOBS = "batch/v1/jobs"
GROUP, VERSION, PLURAL = "ratatouille.dev", "v1alpha1", "ratatouilleruns"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

# The project's names with a permissive schema, so that these tests do not depend on the spec's
# schema evolving (test_project_crd_* use the real file).
TEST_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: ratatouilleruns.ratatouille.dev
spec:
  group: ratatouille.dev
  scope: Namespaced
  names:
    kind: RatatouilleRun
    listKind: RatatouilleRunList
    plural: ratatouilleruns
    singular: ratatouillerun
    shortNames: [rrun]
    categories: [ratatouille]
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Complete, type: string, jsonPath: '.status.conditions[?(@.type=="Complete")].status'}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-preserve-unknown-fields: true
            properties:
              selection: {type: string, enum: [uniform, greedy], default: uniform}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"""


@pytest.fixture()
def crd_path(tmp_path):
    path = tmp_path / "crd.yaml"
    path.write_text(TEST_CRD)
    return path


@pytest.fixture()
def k8s(crd_path):
    with Emulator(crds=[crd_path]) as emulator:
        yield emulator
        assert emulator.errors == []  # no request ever hit an emulator bug


@pytest.fixture()
def api(k8s):
    cfg = kubernetes.client.Configuration()
    cfg.host = k8s.url
    with kubernetes.client.ApiClient(cfg) as client:
        yield types.SimpleNamespace(
            custom=kubernetes.client.CustomObjectsApi(client),
            batch=kubernetes.client.BatchV1Api(client),
            core=kubernetes.client.CoreV1Api(client),
            client=client)


def run_body(name, **spec):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RatatouilleRun",
            "metadata": {"name": name, "labels": {"team": "vision"}}, "spec": {"x": 1, **spec},
            "status": {"phase": "Bogus"}}


def job_body(name, labels=None, owner=None):
    body = {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": "busybox", "command": ["true"]}]}}}}
    if owner:
        body["metadata"]["ownerReferences"] = [{
            "apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    return body


def raw(k8s, method, path, body=None, headers=None):
    """A plain HTTP request: (status code, decoded JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(k8s.url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as rsp:
            return rsp.status, json.load(rsp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def status_of(exc_info):
    return exc_info.value.status


# --- the kubernetes Python client --------------------------------------------------------------

def test_custom_resource_lifecycle_metadata_and_status_subresource(k8s, api):
    created = api.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, run_body("r1"))
    meta = created["metadata"]
    assert uuid.UUID(meta["uid"]).version == 4
    assert RFC3339.match(meta["creationTimestamp"])
    assert meta["namespace"] == "default" and meta["generation"] == 1
    assert "status" not in created  # create ignores status when the CRD has a status subresource
    assert created["spec"]["selection"] == "uniform"  # schema default applied
    rv1 = int(meta["resourceVersion"])

    got = api.custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "r1")
    assert got == created

    spec_patched = api.custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "r1", {"spec": {"x": 2}, "status": {"phase": "Sneaky"}})
    assert spec_patched["metadata"]["generation"] == 2
    assert "status" not in spec_patched  # the main resource ignores status changes
    rv2 = int(spec_patched["metadata"]["resourceVersion"])
    assert rv2 > rv1

    status_patched = api.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "r1", {"status": {"phase": "Running"}, "spec": {"x": 99}})
    assert status_patched["status"] == {"phase": "Running"}
    assert status_patched["spec"]["x"] == 2  # the status subresource ignores spec changes
    assert status_patched["metadata"]["generation"] == 2  # status changes do not bump generation
    rv3 = int(status_patched["metadata"]["resourceVersion"])
    assert rv3 > rv2

    noop = api.custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "r1", {"spec": {"x": 2}})
    assert int(noop["metadata"]["resourceVersion"]) == rv3  # a no-op patch changes nothing

    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, run_body("r1"))
    assert status_of(exc) == 409
    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "r1",
                                                  {"metadata": {"resourceVersion": str(rv1)}, "spec": {"x": 3}})
    assert status_of(exc) == 409  # a stale resourceVersion is a failed precondition
    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                                   run_body("r2", selection="best"))
    assert status_of(exc) == 422 and "supported values" in exc.value.body

    listing = api.custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert listing["kind"] == "RatatouilleRunList" and listing["apiVersion"] == f"{GROUP}/{VERSION}"
    assert int(listing["metadata"]["resourceVersion"]) >= rv3
    assert [i["metadata"]["name"] for i in listing["items"]] == ["r1"]

    api.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "r1")
    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "r1")
    assert status_of(exc) == 404
    assert k8s.get(RUNS, "default", "r1") is None


def test_jobs_defaults_selectors_validation_and_status(k8s, api):
    job = api.batch.create_namespaced_job("default", job_body("j1", {"run": "a", "stage": "aux"}))
    assert job.metadata.namespace == "default" and job.metadata.uid
    assert job.spec.backoff_limit == 6 and job.spec.completions == 1
    assert job.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": job.metadata.uid}
    assert job.spec.template.metadata.labels["job-name"] == "j1"
    api.batch.create_namespaced_job("default", job_body("j2", {"run": "a", "stage": "target"}))
    api.batch.create_namespaced_job("default", job_body("j3", {"run": "b"}))
    k8s.create(JOBS, job_body("j4", {"run": "c"}), namespace="other")

    def names(**kw):
        return sorted(j.metadata.name for j in api.batch.list_namespaced_job("default", **kw).items)

    assert names(label_selector="run=a") == ["j1", "j2"]
    assert names(label_selector="run=a,stage!=aux") == ["j2"]
    assert names(label_selector="stage") == ["j1", "j2"]
    assert names(label_selector="!stage") == ["j3"]
    assert names(label_selector="run in (a,b),stage notin (target)") == ["j1", "j3"]
    assert names(field_selector="metadata.name=j3") == ["j3"]
    assert sorted(j.metadata.name for j in api.batch.list_job_for_all_namespaces().items) == ["j1", "j2", "j3", "j4"]
    assert [j["metadata"]["name"] for j in k8s.list(JOBS, labels={"run": "c"})] == ["j4"]
    assert "other" in [n.metadata.name for n in api.core.list_namespace().items]

    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.batch.create_namespaced_job("default", job_body("x" * 64))
    assert status_of(exc) == 422  # Job names must be RFC 1123 labels, as in a real cluster
    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.batch.create_namespaced_job("default", job_body("bad-label", {"run": "a/b"}))
    assert status_of(exc) == 422
    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.batch.patch_namespaced_job("j1", "default", {"spec": {"template": {"spec": {"restartPolicy": "OnFailure"}}}})
    assert status_of(exc) == 422  # the pod template is immutable
    suspended = api.batch.patch_namespaced_job("j1", "default", {"spec": {"suspend": True}})
    assert suspended.spec.suspend is True and suspended.metadata.generation == 2

    done = api.batch.patch_namespaced_job_status("j1", "default", {"status": {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]}})
    assert done.status.succeeded == 1 and done.metadata.generation == 2
    ignored = api.batch.patch_namespaced_job("j1", "default", {"status": {"failed": 5}})
    assert ignored.status.failed is None  # jobs have a status subresource too

    code, jobs = raw(k8s, "GET", "/apis/batch/v1/namespaces/default/jobs",  # the Table kubectl asks for
                     headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    assert code == 200 and jobs["kind"] == "Table"
    rows = {r["cells"][0]: r["cells"] for r in jobs["rows"]}
    assert [c["name"] for c in jobs["columnDefinitions"]] == ["Name", "Status", "Completions", "Age"]
    assert rows["j1"][1:3] == ["Complete", "1/1"]


def test_watch_streams_added_modified_deleted_and_resumes(k8s, api):
    events: list[tuple[str, str, str]] = []
    started = threading.Event()

    def watch():
        w = kubernetes.watch.Watch()
        started.set()
        for ev in w.stream(api.custom.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL,
                           label_selector="team=vision", timeout_seconds=5):
            events.append((ev["type"], ev["object"]["metadata"]["name"],
                           ev["object"]["metadata"]["resourceVersion"]))
            if ev["type"] == "DELETED" and ev["object"]["metadata"]["name"] == "w1":
                w.stop()

    k8s.create(RUNS, run_body("w0"), namespace="default")
    thread = threading.Thread(target=watch)
    thread.start()
    started.wait()
    k8s.wait_for(lambda: events)  # w0 replayed as ADDED
    api.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, run_body("w1"))
    k8s.create(RUNS, dict(run_body("hidden"), metadata={"name": "hidden"}), namespace="default")
    k8s.patch_status(RUNS, "default", "w1", {"phase": "Running"})
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w1")
    thread.join(10)
    assert not thread.is_alive()
    assert [(t, n) for t, n, _ in events] == [("ADDED", "w0"), ("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")]

    # Resuming from a resourceVersion replays only what came after it.
    since = events[1][2]
    with urllib.request.urlopen(f"{k8s.url}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
                                f"?watch=True&resourceVersion={since}&timeoutSeconds=1") as rsp:
        assert rsp.headers["Content-Type"].startswith("application/json")
        replay = [json.loads(line) for line in rsp.read().splitlines()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in replay] == [
        ("ADDED", "hidden"), ("MODIFIED", "w1"), ("DELETED", "w1")]
    with urllib.request.urlopen(f"{k8s.url}/api/v1/namespaces?watch=1&timeoutSeconds=1") as rsp:
        assert [json.loads(line)["object"]["metadata"]["name"] for line in rsp.read().splitlines()] == ["default"]


def test_owner_references_are_garbage_collected(k8s, api):
    owner = api.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, run_body("owner"))
    keeper = api.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, run_body("keeper"))
    api.batch.create_namespaced_job("default", job_body("child", owner=owner))
    api.batch.create_namespaced_job("default", job_body("kept", owner=keeper))
    api.batch.create_namespaced_job("default", job_body("orphan", owner=keeper))
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "owner")
    k8s.wait_for(lambda: k8s.get(JOBS, "default", "child") is None, timeout=5)
    assert k8s.get(JOBS, "default", "kept") is not None

    # Orphan propagation strips the ownerReferences instead of deleting the dependents.
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "keeper",
                                               propagation_policy="Orphan")
    time.sleep(0.3)
    assert k8s.get(JOBS, "default", "kept")["metadata"].get("ownerReferences") is None
    assert k8s.get(JOBS, "default", "orphan") is not None

    # Foreground: the owner waits (deletionTimestamp) until its dependents are gone.
    fg = k8s.create(RUNS, run_body("fg"), namespace="default")
    k8s.create(JOBS, job_body("fg-child", owner=fg), namespace="default")
    k8s.delete(RUNS, "default", "fg", propagation_policy="Foreground")
    k8s.wait_for(lambda: k8s.get(RUNS, "default", "fg") is None and k8s.get(JOBS, "default", "fg-child") is None,
                 timeout=5)


def test_finalizers_json_patch_and_requests_recorded(k8s, api):
    created = api.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, run_body("fin"))
    rv = created["metadata"]["resourceVersion"]
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
           {"op": "add", "path": "/metadata/finalizers", "value": ["ratatouille.dev/cleanup"]}]
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/fin"
    code, patched = raw(k8s, "PATCH", path, ops, {"Content-Type": "application/json-patch+json"})
    assert code == 200 and patched["metadata"]["finalizers"] == ["ratatouille.dev/cleanup"]
    code, failed = raw(k8s, "PATCH", path, ops, {"Content-Type": "application/json-patch+json"})
    assert (code, failed["kind"], failed["reason"]) == (422, "Status", "Invalid")  # kopf's optimistic concurrency

    api.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "fin")
    terminating = k8s.get(RUNS, "default", "fin")
    assert RFC3339.match(terminating["metadata"]["deletionTimestamp"])
    api.custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "fin",
                                              {"metadata": {"finalizers": None}})
    assert k8s.get(RUNS, "default", "fin") is None

    reqs = k8s.requests
    assert ApiRequest("create", GROUP, VERSION, PLURAL, None, "default", None) in reqs
    assert ApiRequest("delete", GROUP, VERSION, PLURAL, None, "default", "fin") in reqs
    assert k8s.count("patch", RUNS) == 3 and k8s.count("create", RUNS) == 1
    assert {r.verb for r in reqs} == {"create", "patch", "delete"}

    k8s.fail_next("create", JOBS, code=500)
    with pytest.raises(kubernetes.client.ApiException) as exc:
        api.batch.create_namespaced_job("default", job_body("flaky"))
    assert status_of(exc) == 500
    api.batch.create_namespaced_job("default", job_body("flaky"))
    assert k8s.count("create", JOBS) == 2


def test_project_crd_is_served_with_schema_and_printer_columns(api):
    if not PROJECT_CRD.exists():
        pytest.skip("crds/ratatouilleruns.ratatouille.dev.yaml not written yet")
    with Emulator(crds=[PROJECT_CRD]) as k8s:
        rd = k8s.resources[RUNS]
        assert rd.kind == "RatatouilleRun" and rd.namespaced and rd.has_status and "rrun" in rd.shortnames
        crds = k8s.list("apiextensions.k8s.io/v1/customresourcedefinitions")
        assert [c["metadata"]["name"] for c in crds] == ["ratatouilleruns.ratatouille.dev"]
        with pytest.raises(Exception) as exc:
            k8s.create(RUNS, {"metadata": {"name": "bad"}, "spec": {"foundation": {}}}, namespace="default")
        assert "Required value" in str(exc.value)


# --- kubectl -----------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_get_apply_patch_status_delete(k8s, tmp_path):
    kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), HOME=str(tmp_path))

    def kubectl(*args, check=True):
        proc = subprocess.run(["kubectl", f"--cache-dir={tmp_path}/cache", *args], env=env,
                              capture_output=True, text=True, timeout=30)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    manifest = tmp_path / "run.yaml"
    manifest.write_text(textwrap.dedent(f"""\
        apiVersion: {GROUP}/{VERSION}
        kind: RatatouilleRun
        metadata:
          name: from-kubectl
        spec:
          selection: greedy
        """))
    assert "created" in kubectl("apply", "-f", str(manifest), "--validate=false").stdout
    kubectl("patch", "rrun", "from-kubectl", "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"phase": "Succeeded", "conditions": [{"type": "Complete", "status": "True"}]}}))
    table = kubectl("get", "rrun").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "COMPLETE", "AGE"]
    assert table[1].split()[:3] == ["from-kubectl", "Succeeded", "True"]
    got = json.loads(kubectl("get", "ratatouilleruns.ratatouille.dev/from-kubectl", "-o", "json").stdout)
    assert got["spec"]["selection"] == "greedy" and got["status"]["phase"] == "Succeeded"

    manifest.write_text(manifest.read_text().replace("greedy", "uniform"))
    assert "configured" in kubectl("apply", "-f", str(manifest), "--validate=false").stdout
    assert k8s.get(RUNS, "default", "from-kubectl")["spec"]["selection"] == "uniform"
    assert k8s.get(RUNS, "default", "from-kubectl")["metadata"]["generation"] == 2

    assert "short name" not in kubectl("get", "crd").stderr  # subresources carry no short names
    assert "deleted" in kubectl("delete", "rrun", "from-kubectl").stdout
    assert k8s.get(RUNS, "default", "from-kubectl") is None
    missing = kubectl("get", "rrun", "from-kubectl", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


# --- a kopf operator ---------------------------------------------------------------------------

OPERATOR = """\
import os
import kopf
import kubernetes

@kopf.on.startup()
def configure(settings, **_):
    settings.persistence.finalizer = "ratatouille.dev/test-operator"
    settings.posting.level = 20
    kubernetes.config.load_kube_config(config_file=os.environ["KUBECONFIG"])

@kopf.index("batch/v1", "jobs")
def jobs_by_run(namespace, name, labels, **_):
    run = labels.get("ratatouille.dev/run")
    return {(namespace, run): name} if run else None

@kopf.on.create("ratatouille.dev", "v1alpha1", "ratatouilleruns")
def create_job(body, name, namespace, patch, **_):
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": f"{name}-member-0", "labels": {"ratatouille.dev/run": name}},
           "spec": {"template": {"spec": {"restartPolicy": "Never",
                                          "containers": [{"name": "main", "image": "busybox"}]}}}}
    kopf.adopt(job, owner=body)
    kubernetes.client.BatchV1Api().create_namespaced_job(namespace, job)
    kopf.event(body, type="Normal", reason="JobCreated", message=job["metadata"]["name"])
    patch.status["phase"] = "Running"

@kopf.timer("ratatouille.dev", "v1alpha1", "ratatouilleruns", interval=0.3)
def count_children(name, namespace, jobs_by_run, patch, **_):
    patch.status["children"] = len(jobs_by_run.get((namespace, name), []))
"""


def test_kopf_operator_handles_create_timer_index_and_deletion(k8s, tmp_path, monkeypatch):
    from kopf.testing import KopfRunner

    operator = tmp_path / "operator.py"
    operator.write_text(OPERATOR)
    kubeconfig = str(k8s.write_kubeconfig(tmp_path / "kubeconfig"))
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    # kubernetes.config reads $KUBECONFIG once, at import; kopf's in-process login goes through it.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    # kopf loads the operator file into its process-wide default registry, which may already hold
    # the project's own handlers (another test imported ratatouille_operator.main): isolate it.
    import kopf

    saved = kopf.get_default_registry()
    fresh = kopf.OperatorRegistry()
    kopf.on.login(registry=fresh)(kopf.login_via_client)  # what kopf's default registry brings
    kopf.set_default_registry(fresh)
    try:
        _run_kopf_operator(k8s, operator)
    finally:
        kopf.set_default_registry(saved)


def _run_kopf_operator(k8s, operator):
    from kopf.testing import KopfRunner

    with KopfRunner(["run", "--standalone", "--namespace", "default", str(operator)], timeout=60) as runner:
        run = k8s.create(RUNS, {"metadata": {"name": "demo"}, "spec": {"x": 1}}, namespace="default")
        job = k8s.wait_for(lambda: k8s.get(JOBS, "default", "demo-member-0"), timeout=20)
        ref = job["metadata"]["ownerReferences"][0]
        assert (ref["uid"], ref["kind"], ref["controller"]) == (run["metadata"]["uid"], "RatatouilleRun", True)
        done = k8s.wait_for(lambda: (k8s.get(RUNS, "default", "demo").get("status") or {}).get("children") == 1
                            and k8s.get(RUNS, "default", "demo"), timeout=20)
        assert done["status"]["phase"] == "Running"
        assert done["metadata"]["generation"] == 1  # kopf's status and annotation writes are not spec changes
        assert "ratatouille.dev/test-operator" in done["metadata"]["finalizers"]  # added by JSON patch
        assert k8s.count("patch", RUNS, subresource="status") >= 1
        event = k8s.wait_for(lambda: k8s.list("v1/events", "default"), timeout=10)[0]
        assert (event["reason"], event["involvedObject"]["uid"]) == ("JobCreated", run["metadata"]["uid"])

        k8s.delete(RUNS, "default", "demo")  # kopf releases its finalizer, then owner GC takes the Job
        k8s.wait_for(lambda: k8s.get(RUNS, "default", "demo") is None, timeout=20)
        k8s.wait_for(lambda: k8s.get(JOBS, "default", "demo-member-0") is None, timeout=5)
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0
    assert k8s.count("create", JOBS) == 1
    assert k8s.count("watch", RUNS) >= 1 and k8s.count("watch", JOBS) >= 1


# --- the CLI hook ------------------------------------------------------------------------------

def test_serve_forever_writes_kubeconfig_and_stops(crd_path, tmp_path):
    stop = threading.Event()
    out = io.StringIO()
    args = types.SimpleNamespace(crds=[str(crd_path)], kubeconfig=str(tmp_path / "kc"), port=0)
    thread = threading.Thread(target=serve_forever, args=(args,), kwargs={"stop_event": stop, "out": out})
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while "Ctrl-C" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = out.getvalue()
        assert f"export KUBECONFIG={tmp_path / 'kc'}" in text
        server = re.search(r"server: (http://127\.0\.0\.1:\d+)", (tmp_path / "kc").read_text()).group(1)
        with urllib.request.urlopen(f"{server}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}") as rsp:
            assert json.load(rsp)["kind"] == "RatatouilleRunList"
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive()
    assert "Stopping" in out.getvalue()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_apply_of_a_crd_serves_the_custom_resource(crd_path, tmp_path):
    with Emulator() as k8s:
        env = dict(os.environ, KUBECONFIG=str(k8s.write_kubeconfig(tmp_path / "kc")), HOME=str(tmp_path))
        before = subprocess.run(["kubectl", "get", "rrun"], env=env, capture_output=True, text=True, timeout=30)
        assert before.returncode != 0
        applied = subprocess.run(["kubectl", "apply", "--validate=false", "-f", str(crd_path)],
                                 env=env, capture_output=True, text=True, timeout=30)
        assert applied.returncode == 0, applied.stderr
        waited = subprocess.run(["kubectl", "wait", "--for=condition=established", "--timeout=5s",
                                 "crd/ratatouilleruns.ratatouille.dev"], env=env, capture_output=True, text=True,
                                timeout=30)
        assert waited.returncode == 0, waited.stderr
        k8s.create(RUNS, {"metadata": {"name": "seeded"}, "spec": {}}, namespace="default")
        after = subprocess.run(["kubectl", "get", "rrun", "-o", "name"], env=env, capture_output=True, text=True,
                               timeout=30)
        assert after.stdout.split() == ["ratatouillerun.ratatouille.dev/seeded"], after.stderr


def test_namespace_deletion_waits_for_finalized_contents(k8s):
    k8s.create("v1/secrets", {"metadata": {"name": "creds"}, "stringData": {"k": "v"}}, namespace="team-a")
    k8s.create(RUNS, {"metadata": {"name": "held", "finalizers": ["ratatouille.dev/x"]}, "spec": {}},
               namespace="team-a")
    assert k8s.get("v1/namespaces", None, "team-a")["status"]["phase"] == "Active"  # created on first use
    k8s.delete("v1/namespaces", None, "team-a")
    k8s.wait_for(lambda: k8s.get("v1/secrets", "team-a", "creds") is None, timeout=5)
    assert k8s.get("v1/namespaces", None, "team-a")["status"]["phase"] == "Terminating"
    assert k8s.get(RUNS, "team-a", "held")["metadata"]["deletionTimestamp"]
    k8s.patch(RUNS, "team-a", "held", {"metadata": {"finalizers": None}})
    k8s.wait_for(lambda: k8s.get("v1/namespaces", None, "team-a") is None, timeout=5)
