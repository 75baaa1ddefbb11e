"""One writer per member prefix: the lease (lease.py) on file:// and on moto S3, the conditional
writes under it, per-attempt checkpoints, and two real trainers started at once on one member."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from ratatouille_trainer import lease as lease_mod
from ratatouille_trainer import stages
from ratatouille_trainer.lease import Lease, LeaseBusy, LeaseLost
from ratatouille_contract.layout import join
from ratatouille_trainer.storage import RetryPolicy, open_storage
from ratatouille_trainer.training import Checkpointer

from . import util
from .test_results_integrity import _lp_job, world  # noqa: F401  (its tiny dataset and foundation)
from .test_stages import _env, _quiet  # noqa: F401  (the same CPU-only, no-fault environment)

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def store(storage_root):
    root, endpoint = storage_root
    return open_storage(root, endpoint, retry=FAST), join(root, "member"), endpoint


def _lease(storage, prefix, **kw):
    kw.setdefault("log", lambda msg: None)
    return Lease(storage, prefix, stage="aux", member="p-0", **kw)


# ------------------------------------------------------------------------ conditional writes

def test_conditional_writes_are_compare_and_swap(store):
    storage, prefix, _ = store
    uri = join(prefix, "LEASE")
    assert storage.read_versioned(uri) is None
    v1 = storage.write_if(uri, b"one", match=None)
    assert v1 and storage.write_if(uri, b"two", match=None) is None  # exists: create refused
    data, version, age = storage.read_versioned(uri)
    assert (data, version) == (b"one", v1) and 0 <= age < 5
    assert storage.write_if(uri, b"three", match="not-the-version") is None
    v2 = storage.write_if(uri, b"four", match=v1)
    assert v2 and v2 != v1 and storage.read_versioned(uri)[:2] == (b"four", v2)
    assert storage.write_if(uri, b"five", match=v1) is None  # a stale version loses
    assert not storage.delete_if(uri, v1) and storage.exists(uri)
    assert storage.delete_if(uri, v2) and storage.read_versioned(uri) is None
    assert storage.write_if(uri, b"six", match=v2) is None  # If-Match on a missing object
    assert storage.list(prefix) == []  # no temporary file left behind


# ------------------------------------------------------------------------------------ lease

def test_a_second_writer_finds_a_live_lease_and_fails_clearly_without_writing(store):
    storage, prefix, _ = store
    holder = _lease(storage, prefix, ttl=1.5).acquire()  # its heartbeat renews every 0.5 s
    try:
        time.sleep(2.5)  # past one TTL: only the heartbeat keeps it alive
        before = storage.read_versioned(join(prefix, "LEASE"))[0]
        with pytest.raises(LeaseBusy) as err:
            _lease(storage, prefix, wait=0).acquire()
        msg = str(err.value)
        assert "\n" not in msg and prefix in msg and f"pid {os.getpid()}" in msg
        assert holder.attempt in msg and "nothing was trained or deleted" in msg
        assert json.loads(storage.read_versioned(join(prefix, "LEASE"))[0])["holder"] == \
            json.loads(before)["holder"]
        holder.confirm()
    finally:
        holder.release()
    assert storage.list(prefix) == []  # released: the lease is gone


def test_a_waiting_writer_takes_the_lease_when_the_holder_is_done(store):
    storage, prefix, _ = store
    holder = _lease(storage, prefix, ttl=3).acquire()  # the waiter polls every 0.5 s
    threading.Timer(1.0, holder.release).start()
    t0 = time.monotonic()
    with _lease(storage, prefix, wait=30) as waiter:
        assert waiter.waited and waiter.took_over is None
        assert 0.9 < time.monotonic() - t0 < 15


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops(store):
    storage, prefix, _ = store
    stale = _lease(storage, prefix, ttl=1.0, heartbeat=False).acquire()  # a holder that froze
    time.sleep(2.2)  # S3 ages have 1 s resolution
    new = _lease(storage, prefix, ttl=60, wait=0).acquire()
    try:
        assert "lease expired" in new.took_over and stale.attempt in new.took_over
        stale.renew()  # the stale holder's compare-and-swap fails: it knows it lost
        with pytest.raises(LeaseLost, match="now held by"):
            stale.check()
        stale.release()  # must not delete the new holder's lease
        new.confirm()
    finally:
        new.release()


_HOLD_AND_DIE = textwrap.dedent("""
    import os, sys
    from ratatouille_trainer.lease import Lease
    from ratatouille_trainer.storage import open_storage
    lease = Lease(open_storage(sys.argv[1], sys.argv[2] or None), sys.argv[1], ttl=600,
                  log=lambda m: None).acquire()
    print(lease.attempt, flush=True)
    os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, the lease stays
""")


def test_a_dead_local_holder_is_taken_over_at_once(store):
    storage, prefix, endpoint = store
    proc = subprocess.run([sys.executable, "-c", _HOLD_AND_DIE, prefix, endpoint or ""],
                          capture_output=True, text=True, env=util.env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    body = json.loads(storage.read_versioned(join(prefix, "LEASE"))[0])
    assert body["ttlSeconds"] == 600 and body["pid"] != os.getpid()
    t0 = time.monotonic()
    with _lease(storage, prefix, wait=0) as lease:  # wait=0: it would fail if it had to wait
        assert "its process is gone" in lease.took_over and proc.stdout.strip() in lease.took_over
    assert time.monotonic() - t0 < 5


def test_a_reused_pid_or_another_host_is_not_mistaken_for_the_holder():
    here = lease_mod._this_host()
    parent = os.getppid()
    alive = {**here, "pid": parent, "pidStart": lease_mod._pid_start(parent)}
    assert not lease_mod.holder_is_dead(alive)
    assert lease_mod.holder_is_dead({**alive, "pidStart": "1"})  # same pid, started at another time
    assert not lease_mod.holder_is_dead({**alive, "pid": 2 ** 22 + 7, "host": "another-node"})
    assert not lease_mod.holder_is_dead({**alive, "pid": 2 ** 22 + 7, "pidNamespace": "pid:[1]"})


# ------------------------------------------------------------------------------ checkpoints

def _ck_save(ck: Checkpointer, step: int, value: float, best_step: int | None = None):
    model = {"w": torch.full((4,), value)}
    best = {"dir": Checkpointer.dirname(best_step if best_step is not None else step), "step": step}
    ck.save(step, model, {"m": torch.zeros(2)}, {"step": step, "best": best})


def test_a_stale_writer_never_deletes_the_current_writers_checkpoint(store):
    storage, prefix, _ = store
    root = join(prefix, "checkpoint")
    current = Checkpointer(storage, root, "fp", attempt="attempt-2-current")
    _ck_save(current, 4, 4.0)
    stale = Checkpointer(storage, root, "fp", attempt="attempt-1-stale")
    for step in (0, 2, 6):  # it prunes its older steps: only ever under its own folder
        _ck_save(stale, step, float(step))
    stale.discard("test")  # dropping its checkpoint drops only its own folder
    assert sorted(r for r, _, _ in storage.entries(root)) == [
        "attempt-2-current/state.json", "attempt-2-current/step-00000004/model.safetensors",
        "attempt-2-current/step-00000004/optimizer.safetensors"]


def test_a_new_attempt_resumes_from_the_newest_complete_checkpoint_of_earlier_ones(store):
    storage, prefix, _ = store
    root = join(prefix, "checkpoint")
    _ck_save(Checkpointer(storage, root, "fp", attempt="attempt-1"), 6, 6.0)
    older = Checkpointer(storage, root, "fp", attempt="attempt-2")
    _ck_save(older, 2, 2.0)
    _ck_save(older, 4, 4.0, best_step=2)
    storage.write_bytes(join(root, "attempt-3", "step-00000008", "model.safetensors"), b"half")  # no state.json
    ck = Checkpointer(storage, root, "fp", attempt="attempt-4")
    state = ck.load()
    assert state["step"] == 6 and ck.source == join(root, "attempt-1")
    assert torch.equal(ck.fetch_state_dict(state["latestDir"], "model.safetensors")["w"], torch.full((4,), 6.0))
    # resuming from attempt-2 (best step 2 there): the first save makes this attempt complete
    ck2 = Checkpointer(storage, root, "fp", attempt="attempt-5")
    ck2.source = join(root, "attempt-2")
    _ck_save(ck2, 8, 8.0, best_step=2)
    rels = {r for r, _, _ in storage.entries(join(root, "attempt-5"))}
    assert {"state.json", "step-00000002/model.safetensors", "step-00000008/model.safetensors"} <= rels
    ck.clear()  # after DONE: every attempt goes
    assert storage.list(root) == []


# --------------------------------------------------------------------- real trainers, at once

def _lp(world, out, endpoint=None, steps=16, eval_every=4):
    job = _lp_job(world, out, steps=steps, eval_every=eval_every)
    job["storage"]["endpoint"] = endpoint
    return job


def _trainer(job: dict, **env_extra) -> subprocess.Popen:
    env = util.env()
    env.update({"RATATOUILLE_PROGRESS_EVERY": "1", **env_extra})
    return subprocess.Popen([sys.executable, "-m", "ratatouille_trainer.cli", job["stage"], "--job-json",
                             json.dumps(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _events(stdout: str) -> list[str]:
    return [json.loads(line)["event"] for line in stdout.splitlines() if line.startswith("{")]


def _model_sha(storage, out: str) -> str:
    return storage.sha256_of(join(out, "model.safetensors"))


def test_two_trainers_of_one_member_at_once_train_it_once(world, storage_root):
    root, endpoint = storage_root
    storage = open_storage(root, endpoint, retry=FAST)
    ref_out, out = join(root, "single", "lp"), join(root, "twice", "lp")
    single = _trainer(_lp(world, ref_out, endpoint))
    assert single.wait(timeout=300) == 0, single.stderr.read()
    single.stdout.close(), single.stderr.close()

    procs = [_trainer(_lp(world, out, endpoint)) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err for _, _, err in results]
    trained = [r for r in results if "result" in _events(r[1])]
    waited = [r for r in results if "complete" in _events(r[1])]
    assert len(trained) == 1 and len(waited) == 1, [_events(o) for _, o, _ in results]
    assert "progress" not in _events(waited[0][1])  # it trained nothing
    assert "is being written by" in waited[0][2] and "already complete" in waited[0][2]
    # the model is intact and is the single writer's, bit for bit; nothing else is left
    assert _model_sha(storage, out) == _model_sha(storage, ref_out)
    assert json.loads(storage.read_text(join(out, "DONE")))["sha256"] == _model_sha(storage, out)
    assert sorted(r for r, _, _ in storage.entries(out)) == ["DONE", "metrics.json", "model.safetensors"]


def test_a_sigkilled_trainer_is_taken_over_at_once_and_resumes_bit_identically(world, tmp_path):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    ref = _trainer(_lp(world, ref_out, steps=40, eval_every=2))
    proc = _trainer(_lp(world, out, steps=40, eval_every=2))
    for line in proc.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "progress" and event.get("step", 0) >= 12:
            proc.send_signal(signal.SIGKILL)  # mid-training, after several checkpoints
            break
    proc.wait(timeout=60)
    proc.stdout.close(), proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.exists(os.path.join(out, "LEASE")) and not os.path.exists(os.path.join(out, "DONE"))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    ref.stdout.close(), ref.stderr.close()

    resumed = _trainer(_lp(world, out, steps=40, eval_every=2), RATATOUILLE_LEASE_WAIT="0")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "took over the lease" in stderr and "its process is gone" in stderr
    assert _events(stdout)[0] == "resume"
    storage = open_storage(out)
    assert _model_sha(storage, out) == _model_sha(storage, ref_out)  # bit-identical
    assert sorted(os.listdir(out)) == ["DONE", "metrics.json", "model.safetensors"]


def test_a_writer_that_lost_its_lease_writes_no_model_and_no_done(world, tmp_path):
    out = str(tmp_path / "lp")
    storage = open_storage(out)
    lease = _lease(storage, out, heartbeat=False).acquire()
    # another writer takes the lease over (as if this one had stalled past its TTL)
    assert storage.write_if(join(out, "LEASE"), json.dumps({"holder": "other", "pid": 1}).encode(),
                            match=lease._version)
    with pytest.raises(LeaseLost, match="now held by"):
        stages.run_stage(util.desc(_lp(world, out, steps=4, eval_every=2)), progress=_quiet(), lease=lease)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "DONE"))
    lease.release()
    assert os.path.exists(os.path.join(out, "LEASE"))  # the other writer's lease stays
