"""The operator end to end on the upstream control plane: the chart installed by real Helm, the
operator running as its Deployment's pod with the chart's ServiceAccount (RBAC enforced by the
API server), child Jobs run by the real Job controller, their pods by the node agent as real
trainer processes on tiny data (timm test_resnet at 32 px, a handful of steps), moto S3 as the
run's storage.

One cluster and one cluster-wide operator serve the whole module; each test uses its own
namespace (PodSecurity `restricted`). Tests that only exercise the control flow (suspend,
deadline, invalid spec, failure budget) let the node agent complete or fail pods without a
trainer process.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.controlplane import free_port
from tests.operator.harness import (ACCESS_KEY, BUCKET, SECRET_KEY, JOBS, REPO, Cluster, cluster,  # noqa: F401
                                    operator_process, run_manifest, write_datasets)
from ratatouille_operator.executor import stop_process

pytest.importorskip("kopf")
pytest.importorskip("timm")

LP, AUX, TARGET, AVG = "linear-probe", "aux", "target", "average"



def wait_event(cluster, ns: str, name: str, reason: str, timeout: float = 15) -> None:
    """Events are posted right after the status patch that a test waits on: give them a moment."""
    cluster.wait_for(lambda: any(e["reason"] == reason for e in cluster.events(ns, name)), timeout,
                     f"a {reason} Event for {ns}/{name}")

def stage_of(job) -> str:
    return (job["metadata"].get("labels") or {}).get("ratatouille.dev/stage", "")


def member_of(job) -> str:
    return (job["metadata"].get("labels") or {}).get("ratatouille.dev/member", "")


def condition(run: dict, ctype: str) -> dict:
    return next((c for c in (run.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory):
    """Tiny datasets on S3 and a recycled fine-tuning (a test_resnet featurizer) on S3."""
    from tests.trainer.util import write_foundation

    tmp = tmp_path_factory.mktemp("data")
    local = write_datasets(tmp)
    recycled = write_foundation(tmp / "recycled.safetensors", prefix="featurizer.", with_head=False, seed=7)
    return {"target": cluster.upload_dir(local["target"], "datasets/target"),
            "aux": cluster.upload_dir(local["aux"], "datasets/aux"),
            "recycled": cluster.upload_file(recycled, "community/recycled.safetensors")}


@pytest.fixture(autouse=True)
def _fresh_hooks(cluster):
    cluster.controller.reset()
    yield
    cluster.controller.reset()
    cluster.controller.release()


@contextlib.contextmanager
def prometheus(tmp: Path, target_port: int):
    """The Debian `prometheus` on a free loopback port scraping `target_port` every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (make system-deps)")
    port = free_port()
    cfg = tmp / "prometheus.yml"
    cfg.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                   "scrape_configs:\n- job_name: ratatouille-operator\n"
                   f"  static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n")
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as rsp:
                    if rsp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        stop_process(proc, 15)
        log.close()


def promql(url: str, query: str) -> dict:
    q = urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as rsp:
        return json.load(rsp)


# ------------------------------------------------------------------------------------------------
# a + g + h: the full graph with real trainers, scraped by Prometheus; no key material anywhere

@pytest.mark.slow
def test_full_run_succeeds_with_model_lineage_columns_metrics_and_no_key_material(
        cluster, operator_process, data, tmp_path):
    ns = cluster.namespace("e2e-main")
    manifest = run_manifest(
        "soup", dataset=data["target"], runs=4, min_succeeded=2, selection="greedy",
        aux=[{"name": "shapes", "dataset": data["aux"]},
             {"name": "community", "weights": data["recycled"]}])
    with prometheus(tmp_path, operator_process.metrics_port) as prom:
        cluster.apply(manifest, ns)
        run = cluster.wait_phase(ns, "soup", ("Succeeded", "Failed"), timeout=300, operator=operator_process)
        assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)

        # h. Prometheus scraped the operator: the run's Jobs by stage.
        want = {LP: 1, AUX: 1, TARGET: 4, AVG: 1}
        query = f'sum by (stage) (ratatouille_child_jobs_created_total{{namespace="{ns}"}})'

        def by_stage():
            res = promql(prom, query)
            assert res["status"] == "success", res
            got = {r["metric"]["stage"]: int(float(r["value"][1])) for r in res["data"]["result"]}
            return got if got == want else None

        try:
            cluster.wait_for(by_stage, 30, f"{query} == {want}")
        except AssertionError:
            raise AssertionError(f"{query} returned {promql(prom, query)['data']}") from None
        up = promql(prom, 'up{job="ratatouille-operator"}')["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        finished = f'ratatouille_runs_finished_total{{namespace="{ns}",result="Succeeded"}}'
        cluster.wait_for(lambda: [r["value"][1] for r in promql(prom, finished)["data"]["result"]] == ["1"],
                         15, finished)
        try:
            from tests.chart import helmutil
        except ImportError:  # the chart helper (or the helm SDK it needs) is absent: skip this part
            exprs = []
        else:
            exprs = helmutil.alert_exprs() + helmutil.dashboard_queries()
        for expr in exprs:
            res = promql(prom, expr)
            assert res["status"] == "success", (expr, res)

    status = run["status"]
    uid = run["metadata"]["uid"]
    # a. The graph: 1 linear probe, 1 trained auxiliary (the recycled one has no Job), 4 targets
    #    assigned round-robin over foundation/community/shapes, 1 average.
    jobs = cluster.jobs(ns, "soup")
    assert sorted((stage_of(j), member_of(j)) for j in jobs) == sorted(
        [(LP, "0"), (AUX, "shapes-0"), (AVG, "0")] + [(TARGET, str(i)) for i in range(4)])
    for job in jobs:
        ref = job["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("RatatouilleRun", "soup", uid, True)
        assert job["metadata"]["name"].endswith("-a1")
    assert status["progress"] == "7/7"
    assert condition(run, "Complete")["status"] == "True"
    assert condition(run, "Accepted")["status"] == "True"
    assert not run["metadata"].get("finalizers")  # nothing blocks deletion while the operator is down
    result = status["result"]
    assert result["selection"] == "greedy" and 1 <= result["members"] <= 4
    assert 0.0 <= float(result["valAccuracy"]) <= 1.0
    assert set(result["testAccuracy"]) == {"d2"}
    assert status["observedGeneration"] == run["metadata"]["generation"]
    # Member metrics reached status (valAccuracy per finished target).
    targets = [j for j in status["jobs"] if j["stage"] == TARGET]
    assert len(targets) == 4 and all("valAccuracy" in j for j in targets)

    # The final model and its lineage in S3.
    prefix = f"runs/{ns}/soup/{uid}/average/"
    keys = set(cluster.s3_keys(prefix))
    assert {prefix + k for k in ("model.safetensors", "lineage.json", "metrics.json", "DONE")} <= keys
    assert result["model"] == f"s3://{BUCKET}/{prefix}model.safetensors"
    lineage = json.loads(cluster.s3_read(prefix + "lineage.json"))
    text = json.dumps(lineage)
    assert data["recycled"] in text and "shapes" in text and "foundation" in text
    # The trained auxiliary went to the shared cache.
    assert any(k.startswith("runs/cache/aux/") and k.endswith("/DONE") for k in cluster.s3_keys("runs/cache/aux/"))

    # kubectl get rrun: the printer columns with values.
    out = cluster.kubectl("get", "rrun", "-n", ns).stdout.splitlines()
    header, row = out[0].split(), out[1].split()
    assert header[:5] == ["NAME", "PHASE", "PROGRESS", "COMPLETE", "VAL-ACC"], out
    assert row[:4] == ["soup", "Succeeded", "7/7", "True"], out
    assert re.fullmatch(r"\d\.\d{3}", row[4]), out

    # One Event per phase transition, in order.
    wait_event(cluster, ns, "soup", "Succeeded")
    reasons = [e["reason"] for e in sorted(cluster.events(ns, "soup"), key=lambda e: e["metadata"]["creationTimestamp"])]
    for reason in ("Accepted", "TargetStage", "Averaging", "Succeeded"):
        assert reasons.count(reason) == 1, reasons

    # g. Credentials reach pods only through the Secret reference (the whole Secret, envFrom).
    for job in jobs:
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert not any("valueFrom" in e or e["name"].startswith("AWS_SECRET") for e in container["env"])
    assert ACCESS_KEY in operator_process.env.values()  # the operator holds them: the check is not vacuous
    haystacks = {
        "run status": json.dumps(cluster.run(ns, "soup")),
        "events": json.dumps(cluster.events(ns)),
        "job specs": json.dumps(cluster.jobs()),
        "operator log": operator_process.log_text(),
    }
    for what, text in haystacks.items():
        for secret in (ACCESS_KEY, SECRET_KEY):
            assert secret not in text, f"key material in the {what}"


# ------------------------------------------------------------------------------------------------
# b: SIGKILL at three points

@pytest.mark.slow
def test_operator_killed_three_times_completes_without_duplicates_or_retraining(
        cluster, operator_process, data):
    ns = cluster.namespace("e2e-kill")
    ctl = cluster.controller
    # seed 1: its own auxiliary cache entry, so the auxiliary really trains in this run
    manifest = run_manifest("phoenix", dataset=data["target"], runs=2,
                            aux=[{"name": "shapes", "dataset": data["aux"]}], extra_spec={"seed": 1})
    ctl.hold = lambda job: job["metadata"]["namespace"] == ns
    cluster.apply(manifest, ns)

    # 1. right after the first Jobs exist
    cluster.wait_for(lambda: {"phoenix-lp-0-a1", "phoenix-aux-shapes-0-a1"} <= cluster.job_names(ns),
                     60, "the first Jobs", operator_process)
    operator_process.kill()
    operator_process.start()
    ctl.hold = lambda job: job["metadata"]["namespace"] == ns and stage_of(job) in (TARGET, AVG)
    ctl.release(lambda job: stage_of(job) in (LP, AUX))

    # 2. mid-target stage: both target Jobs running
    cluster.wait_for(lambda: {f"{ns}/phoenix-target-0-a1", f"{ns}/phoenix-target-1-a1"} <= set(ctl.starts),
                     120, "the target Jobs to start", operator_process)
    operator_process.kill()
    time.sleep(1)
    operator_process.start()
    ctl.hold = lambda job: job["metadata"]["namespace"] == ns and stage_of(job) == AVG
    ctl.release(lambda job: stage_of(job) == TARGET)

    # 3. during averaging
    cluster.wait_for(lambda: f"{ns}/phoenix-avg-0-a1" in ctl.starts, 120, "the averaging Job to start",
                     operator_process)
    operator_process.kill()
    operator_process.start()
    ctl.hold = None
    ctl.release()

    run = cluster.wait_phase(ns, "phoenix", ("Succeeded", "Failed"), timeout=120, operator=operator_process)
    assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
    names = {"phoenix-lp-0-a1", "phoenix-aux-shapes-0-a1", "phoenix-target-0-a1", "phoenix-target-1-a1",
             "phoenix-avg-0-a1"}
    assert cluster.job_names(ns, "phoenix") == names
    creates = {name: n for (jns, name), n in cluster.job_creates.items() if jns == ns}
    assert creates == {name: 1 for name in names}  # no Job was ever created twice
    # No finished member was retrained: one pod, one trainer process per Job.
    assert {k: v for k, v in ctl.starts.items() if k.startswith(ns + "/")} == {f"{ns}/{n}": 1 for n in names}
    assert {k: v for k, v in ctl.processes.items() if k.startswith(ns + "/")} == {f"{ns}/{n}": 1 for n in names}
    assert operator_process.starts >= 4
    wait_event(cluster, ns, "phoenix", "Succeeded")
    reasons = [e["reason"] for e in cluster.events(ns, "phoenix")]
    assert reasons.count("Succeeded") == 1, reasons


# ------------------------------------------------------------------------------------------------
# c: retries and the failure budget; queueName

@pytest.mark.slow
def test_failed_job_is_retried_as_attempt_2_and_a_dead_member_is_tolerated(cluster, operator_process, data):
    ns = cluster.namespace("e2e-retry")
    ctl = cluster.controller
    ctl.set_fail("flaky-target-1-a1", 1)  # fails once, then attempt 2 trains for real
    ctl.set_fail(lambda job: job["metadata"]["namespace"] == ns and stage_of(job) == TARGET
                 and member_of(job) == "2", 99)  # fails every attempt
    manifest = run_manifest("flaky", dataset=data["target"], runs=3, min_succeeded=2, max_attempts=2,
                            extra_spec={"queueName": "team-gpus"})
    cluster.apply(manifest, ns)
    run = cluster.wait_phase(ns, "flaky", ("Succeeded", "Failed"), timeout=240, operator=operator_process)
    status = run["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    states = {j["metadata"]["name"]: condition({"status": j.get("status") or {}}, "Complete").get("status")
              for j in cluster.jobs(ns, "flaky")}
    assert states["flaky-target-1-a2"] == "True"  # attempt 2 exists and succeeded
    assert {"flaky-target-1-a1", "flaky-target-2-a1", "flaky-target-2-a2"} <= set(states)
    assert "flaky-target-2-a3" not in states  # maxAttempts 2
    assert status["result"]["members"] == 2  # runs - 1 (uniform)
    assert status["stages"]["target"] == {"total": 3, "active": 0, "succeeded": 2, "failed": 1}
    # The member that failed for good is reported with its Job's reason.
    dead = [j for j in status["jobs"] if j["name"] == "flaky-target-2-a2"]
    assert dead and dead[0]["state"] == "Failed" and dead[0]["reason"] == "BackoffLimitExceeded"
    reasons = [e["reason"] for e in cluster.events(ns, "flaky")]
    assert "Retrying" in reasons and "MembersFailed" in reasons
    # queueName: the Kueue label on every child Job and its pod template.
    for job in cluster.jobs(ns, "flaky"):
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
        assert job["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"


def test_run_fails_with_min_succeeded_not_met(cluster, operator_process):
    ns = cluster.namespace("e2e-budget")
    ctl = cluster.controller
    ctl.instant = True
    ctl.set_fail(lambda job: job["metadata"]["namespace"] == ns and member_of(job) == "1", 99)
    cluster.apply(run_manifest("doomed", dataset="s3://ratatouille/datasets/target", runs=2, min_succeeded=2), ns)
    run = cluster.wait_phase(ns, "doomed", ("Succeeded", "Failed"), timeout=60, operator=operator_process)
    assert run["status"]["phase"] == "Failed"
    failed = condition(run, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "MinSucceededNotMet")
    assert "minSucceeded=2" in failed["message"]
    assert condition(run, "Complete")["status"] == "False"
    wait_event(cluster, ns, "doomed", "MinSucceededNotMet")
    events = [e for e in cluster.events(ns, "doomed") if e["reason"] == "MinSucceededNotMet"]
    assert len(events) == 1 and events[0]["type"] == "Warning"
    assert {"doomed-target-1-a1", "doomed-target-1-a2"} <= cluster.job_names(ns, "doomed")
    assert "doomed-avg-0-a1" not in cluster.job_names(ns, "doomed")
    # Deleting the run is not blocked by a finalizer, and its Jobs go with it (owner references).
    assert not run["metadata"].get("finalizers")
    cluster.kubectl("delete", "rrun", "doomed", "-n", ns, "--wait=false")
    # The garbage collector deletes the Jobs once their owner is gone.
    cluster.wait_for(lambda: cluster.run(ns, "doomed") is None and not cluster.jobs(ns), 90,
                     "the run and its Jobs to be gone")


# ------------------------------------------------------------------------------------------------
# d: suspend / resume, deadline

def test_suspend_stops_children_and_creates_none_then_resume_completes(cluster, operator_process):
    ns = cluster.namespace("e2e-suspend")
    ctl = cluster.controller
    ctl.instant = True
    ctl.hold = lambda job: job["metadata"]["namespace"] == ns
    cluster.apply(run_manifest("nap", dataset="s3://ratatouille/datasets/target", runs=2), ns)
    cluster.wait_for(lambda: "nap-lp-0-a1" in ctl.running(), 30, "the linear probe to run", operator_process)

    cluster.kubectl("patch", "rrun", "nap", "-n", ns, "--type", "merge", "-p", '{"spec": {"suspend": true}}')
    run = cluster.wait_phase(ns, "nap", "Suspended", timeout=30, operator=operator_process)
    assert condition(run, "Suspended")["status"] == "True"
    job = cluster.wait_for(lambda: (j := cluster.get(JOBS, ns, "nap-lp-0-a1")) and any(
        c["type"] == "Suspended" and c["status"] == "True" for c in (j.get("status") or {}).get("conditions") or [])
        and j, 30, "the Job to be suspended")
    assert job["spec"]["suspend"] is True and job["status"].get("active", 0) == 0
    cluster.wait_for(lambda: "nap-lp-0-a1" not in ctl.running(), 30, "its pod's process to stop")
    ctl.hold = None
    ctl.release()
    time.sleep(5)  # two resync intervals: still nothing new while suspended
    assert cluster.job_names(ns, "nap") == {"nap-lp-0-a1"}
    assert cluster.run(ns, "nap")["status"]["phase"] == "Suspended"

    cluster.kubectl("patch", "rrun", "nap", "-n", ns, "--type", "merge", "-p", '{"spec": {"suspend": false}}')
    run = cluster.wait_phase(ns, "nap", ("Succeeded", "Failed"), timeout=60, operator=operator_process)
    assert run["status"]["phase"] == "Succeeded"
    assert condition(run, "Suspended")["status"] == "False"
    assert ctl.starts[f"{ns}/nap-lp-0-a1"] == 2  # the suspended pod was replaced on resume
    wait_event(cluster, ns, "nap", "Resumed")
    reasons = [e["reason"] for e in cluster.events(ns, "nap")]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_active_deadline_fails_the_run_and_stops_children(cluster, operator_process):
    ns = cluster.namespace("e2e-deadline")
    ctl = cluster.controller
    ctl.instant = True
    ctl.hold = lambda job: job["metadata"]["namespace"] == ns  # never finishes by itself
    cluster.apply(run_manifest("late", dataset="s3://ratatouille/datasets/target", runs=2,
                               extra_spec={"activeDeadlineSeconds": 3}), ns)
    run = cluster.wait_phase(ns, "late", ("Succeeded", "Failed"), timeout=30, operator=operator_process)
    failed = condition(run, "Failed")
    assert (run["status"]["phase"], failed["reason"]) == ("Failed", "DeadlineExceeded")
    wait_event(cluster, ns, "late", "DeadlineExceeded")
    assert any(e["reason"] == "DeadlineExceeded" and e["type"] == "Warning" for e in cluster.events(ns, "late"))
    cluster.wait_for(lambda: not cluster.job_names(ns, "late"), 15, "the running child to be deleted")
    cluster.wait_for(lambda: not [n for n in ctl.running() if n.startswith("late-")], 15, "its process to stop")


# ------------------------------------------------------------------------------------------------
# e: invalid spec

def test_invalid_spec_is_refused_with_the_field_named_and_no_job(cluster, operator_process):
    ns = cluster.namespace("e2e-invalid")
    cluster.controller.instant = True
    # The server's schema and CEL rules refuse nearly every invalid spec at apply (see
    # test_invalid_on_server.py); a dataset URI with a space is one only the operator refuses.
    cluster.apply(run_manifest("bad", dataset="s3://ratatouille/datasets/my target", runs=2), ns)
    run = cluster.wait_for(lambda: (r := cluster.run(ns, "bad")) and condition(r, "Accepted") and r, 30,
                           "the verdict", operator_process)
    accepted = condition(run, "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidSpec")
    assert "spec.target.dataset" in accepted["message"]
    assert run["status"]["observedGeneration"] == run["metadata"]["generation"]
    time.sleep(4.5)  # two resync intervals: still no Job, still one Event
    events = [e for e in cluster.events(ns, "bad") if e["reason"] == "InvalidSpec"]
    assert len(events) == 1 and events[0]["type"] == "Warning"
    assert "spec.target.dataset" in events[0]["message"]
    assert cluster.jobs(ns) == []
    # Fixing the spec lets the run go ahead.
    cluster.kubectl("patch", "rrun", "bad", "-n", ns, "--type", "merge",
                    "-p", '{"spec": {"target": {"dataset": "s3://ratatouille/datasets/target"}}}')
    run = cluster.wait_phase(ns, "bad", "Succeeded", timeout=60, operator=operator_process)
    assert condition(run, "Accepted")["status"] == "True"


# ------------------------------------------------------------------------------------------------
# f: two namespaces, the auxiliary cache

@pytest.mark.slow
def test_runs_in_two_namespaces_are_independent_and_have_their_own_aux_cache(cluster, operator_process, data):
    a, b = cluster.namespace("team-a"), cluster.namespace("team-b")
    ctl = cluster.controller
    manifest = run_manifest("twin", dataset=data["target"], runs=1, include_foundation=False,
                            aux=[{"name": "shapes", "dataset": data["aux"]}], extra_spec={"seed": 2})
    cluster.apply(manifest, a)
    cluster.wait_for(lambda: (ctl.starts.get(f"{a}/twin-aux-shapes-0-a1") and not any(
        n == "twin-aux-shapes-0-a1" for n in ctl.running())
        and cluster.run(a, "twin")["status"]["stages"]["auxiliary"]["succeeded"] == 1),
        120, "team-a's auxiliary to finish", operator_process)
    cluster.apply(manifest, b)  # same name, other namespace, while team-a's run is still going
    run_a = cluster.wait_phase(a, "twin", ("Succeeded", "Failed"), timeout=180, operator=operator_process)
    run_b = cluster.wait_phase(b, "twin", ("Succeeded", "Failed"), timeout=180, operator=operator_process)
    assert run_a["status"]["phase"] == run_b["status"]["phase"] == "Succeeded"
    assert run_a["metadata"]["uid"] != run_b["metadata"]["uid"]
    jobs = {"twin-lp-0-a1", "twin-aux-shapes-0-a1", "twin-target-0-a1", "twin-avg-0-a1"}
    assert cluster.job_names(a, "twin") == cluster.job_names(b, "twin") == jobs
    # team-b did not take team-a's cached auxiliary (the cache is per namespace unless the
    # chart's sharedAuxCache says otherwise): its own aux Job trained its own entry.
    assert run_b["status"]["stages"]["auxiliary"]["total"] == 1

    def cache_entry(ns: str) -> str:
        cmd = json.dumps(cluster.get(JOBS, ns, "twin-aux-shapes-0-a1")["spec"]["template"]["spec"]["containers"][0]["command"])
        return re.search(r"cache/aux/[0-9a-f]{16}", cmd).group(0)
    entries = {cache_entry(a), cache_entry(b)}
    assert len(entries) == 2
    done = {k.rsplit("/", 1)[0] for k in cluster.s3_keys("runs/cache/aux/") if k.endswith("/DONE")}
    assert {f"runs/{e}" for e in entries} <= done
    for ns, run in ((a, run_a), (b, run_b)):
        for job in cluster.jobs(ns, "twin"):
            assert job["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
        assert run["status"]["storagePrefix"].endswith(f"/{ns}/twin/{run['metadata']['uid']}")


# ------------------------------------------------------------------------------------------------
# the auxiliary cache is keyed by content: new data at the same S3 URI is trained again, and says so

@pytest.mark.slow
def test_an_auxiliary_dataset_changed_in_s3_is_trained_again_with_an_event(cluster, operator_process, tmp_path):
    ns = cluster.namespace("retrain")
    local = write_datasets(tmp_path)
    target = cluster.upload_dir(local["target"], "datasets/retrain-target")
    aux = cluster.upload_dir(local["aux"], "datasets/retrain-aux")

    def run(name: str) -> dict:
        cluster.apply(run_manifest(name, dataset=target, runs=1, include_foundation=False,
                                   aux=[{"name": "shapes", "dataset": aux}], extra_spec={"seed": 4}), ns)
        done = cluster.wait_phase(ns, name, ("Succeeded", "Failed"), timeout=240, operator=operator_process)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        return done

    def retrained(name: str) -> list[dict]:
        return [e for e in cluster.events(ns, name) if e["reason"] == "AuxiliaryRetrained"]

    run("before")
    assert retrained("before") == []  # trained the first time: nothing to explain
    one = next(p for p in sorted(local["aux"].rglob("*.png")))
    cluster.upload_file(one, f"datasets/retrain-aux/{one.parent.relative_to(local['aux']).as_posix()}/added.png")
    after = run("after")  # the same spec: the same cache entry, now of other content
    [event] = retrained("after")
    assert event["type"] == "Normal" and "aux/shapes-0" in event["message"]
    assert f"the dataset {aux} changed since it was trained" in event["message"]
    entry = next(j for j in after["status"]["jobs"] if j["name"] == "after-aux-shapes-0-a1")
    assert "changed since it was trained" in entry["message"]
    [inputs] = [k for k in cluster.s3_keys("runs/cache/aux/") if k.endswith("/inputs.json")
                and aux in cluster.s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read().decode()]
    recorded = json.loads(cluster.s3.client().get_object(Bucket=BUCKET, Key=inputs)["Body"].read())
    assert recorded["dataset"]["objects"] == sum(p.is_file() for p in local["aux"].rglob("*")) + 1


# ------------------------------------------------------------------------------------------------
# dataPreparation: a prepare Job (real trainer, moto S3) decodes the target once; the next run reuses it

@pytest.mark.slow
def test_a_prepared_dataset_is_a_job_of_the_graph_and_the_next_run_reuses_its_entry(
        cluster, operator_process, tmp_path):
    ns = cluster.namespace("prep")
    local = write_datasets(tmp_path)
    target = cluster.upload_dir(local["target"], "datasets/prep-target")

    def run(name: str, seed: int) -> tuple[dict, dict, dict]:
        cluster.apply(run_manifest(name, dataset=target, runs=1, extra_spec={
            "seed": seed, "dataPreparation": {"enabled": True}}), ns)
        done = cluster.wait_phase(ns, name, ("Succeeded", "Failed"), timeout=240, operator=operator_process)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        [prep] = [j for j in done["status"]["jobs"] if j["stage"] == "prepare"]
        assert prep["member"] == "target" and prep["state"] == "Succeeded", prep

        def read(suffix: str) -> dict:
            [key] = [k for k in cluster.s3_keys(f"runs/{ns}/{name}/") if k.endswith(suffix)]
            return json.loads(cluster.s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
        return read("/prepare/target/metrics.json"), read("/target/0/metrics.json"), done

    first, first_member, _ = run("first", 1)
    second, second_member, _ = run("second", 2)
    assert first["reused"] is False and second["reused"] is True     # decoded once, then reused
    entry = first["prepared"]["entry"]
    assert second["prepared"]["entry"] == entry and entry.startswith(f"s3://{BUCKET}/runs/cache/data/")
    # the one entry, complete, and the members of both runs trained from it (their lineage says so)
    assert {k.split("/")[3] for k in cluster.s3_keys("runs/cache/data/")} == {entry.rstrip("/").rsplit("/", 1)[1]}
    assert f"{entry.split(BUCKET + '/', 1)[1].rstrip('/')}/DONE" in cluster.s3_keys("runs/cache/data/")
    assert first_member["preparedData"]["entry"] == second_member["preparedData"]["entry"] == entry


@pytest.mark.slow
def test_a_prepare_job_that_fails_fails_the_run_with_its_reason(cluster, operator_process):
    ns = cluster.namespace("prep-bad")
    missing = f"s3://{BUCKET}/datasets/prep-nothing-here"
    cluster.apply(run_manifest("nodata", dataset=missing, runs=1, max_attempts=1, extra_spec={
        "dataPreparation": {"enabled": True}}), ns)
    done = cluster.wait_phase(ns, "nodata", ("Succeeded", "Failed"), timeout=180, operator=operator_process)
    status = done["status"]
    assert status["phase"] == "Failed", status
    [prep] = [j for j in status["jobs"] if j["stage"] == "prepare"]
    assert prep["state"] == "Failed" and missing in prep.get("message", ""), prep
    assert not [j for j in status["jobs"] if j["stage"] == "target"]   # nothing read the missing data
    warnings = [e for e in cluster.events(ns, "nodata") if e["type"] == "Warning"]
    assert any(missing in e["message"] for e in warnings), warnings


# ------------------------------------------------------------------------------------------------
# namespaced mode, through `helm upgrade`

def test_helm_upgrade_to_namespaced_mode_rolls_the_operator_and_it_handles_only_its_namespace(
        cluster, operator_process):
    mine, other = cluster.namespace("e2e-mine"), cluster.namespace("e2e-other")
    cluster.controller.instant = True
    before = len(cluster.audit())
    old_pod = operator_process._pod()["metadata"]["uid"]
    operator_process.upgrade({"watchNamespaces": [mine]})
    try:
        assert operator_process._pod()["metadata"]["uid"] != old_pod  # a values change rolled it
        manifest = run_manifest("scoped", dataset="s3://ratatouille/datasets/target", runs=1)
        cluster.apply(manifest, other)
        cluster.apply(manifest, mine)
        run = cluster.wait_phase(mine, "scoped", ("Succeeded", "Failed"), timeout=60, operator=operator_process)
        assert run["status"]["phase"] == "Succeeded"
        time.sleep(2.5)  # a resync interval
        assert not (cluster.run(other, "scoped").get("status") or {}) and cluster.jobs(other) == []
        # Namespaced: Roles in the watched namespaces only, and the server holds the operator to them.
        assert not operator_process.refused(before), operator_process.refused(before)
        scoped_requests = operator_process.requests(before)
        assert not {r for r in scoped_requests if r[1] == "namespaces"}, scoped_requests
        token = cluster.cp.token_kubeconfig(operator_process.namespace, operator_process.release,
                                            cluster.tmp / "operator-token.kubeconfig")
        denied = cluster.kubectl("get", "jobs", "-n", other, kubeconfig=token, check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
    finally:
        operator_process.upgrade({"watchNamespaces": []})
    run = cluster.wait_phase(other, "scoped", "Succeeded", timeout=60, operator=operator_process)


# ------------------------------------------------------------------------------------------------
# RBAC: the operator works with exactly the chart's RBAC, enforced by the API server

def test_operator_requests_are_within_the_expected_rbac_and_none_was_refused(cluster, operator_process):
    expected = {tuple(x) for x in json.loads((Path(__file__).parent / "rbac_expected.json").read_text())}
    seen = operator_process.requests()
    # The operator's own startup alone watches runs and Jobs.
    assert {("list", "ratatouille.dev/ratatouilleruns"), ("watch", "ratatouille.dev/ratatouilleruns"),
            ("list", "batch/jobs"), ("watch", "batch/jobs")} <= seen
    assert seen <= expected, f"requests outside rbac_expected.json: {sorted(seen - expected)}"
    assert not operator_process.refused(), operator_process.refused()
    # It lists and watches only its own Jobs, selected by the API server (its watch by the
    # run-uid label every child carries, its per-run lists by the run's label).
    job_reads = [e["requestURI"] for e in cluster.audit()[operator_process.audit_start:]
                 if (e.get("user") or {}).get("username") == operator_process.service_account
                 and not (e.get("userAgent") or "").startswith("kubectl")  # the tests borrow its token
                 and (e.get("objectRef") or {}).get("resource") == "jobs" and e.get("verb") in ("list", "watch")]
    assert any(re.search(r"labelSelector=ratatouille\.dev(/|%2F)run-uid", u) for u in job_reads), job_reads[:3]
    assert all(re.search(r"labelSelector=ratatouille\.dev(/|%2F)run", u) for u in job_reads), \
        [u for u in job_reads if "labelSelector" not in u][:3]


def test_the_server_refuses_what_the_chart_does_not_grant(cluster, operator_process):
    """A request outside the chart's RBAC, made with the operator's own token, is refused."""
    token = cluster.cp.token_kubeconfig(operator_process.namespace, operator_process.release,
                                        cluster.tmp / "operator-token.kubeconfig")
    for args in (("get", "secrets", "-A"), ("create", "deployment", "x", "--image=x", "-n", "default"),
                 ("delete", "nodes", "--all")):
        proc = cluster.kubectl(*args, kubeconfig=token, check=False)
        assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), (args, proc.stderr)
    # ...while what it is granted works with the same token.
    assert cluster.kubectl("get", "rrun", "-A", kubeconfig=token).returncode == 0
