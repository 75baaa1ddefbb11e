"""The largest run the CRD allows still renders into Jobs a node can start: the averaging Job of
finetune.runs at its maximum (500) with a storage URI at its maximum length (1,024 characters)
keeps its job description below the kernel's limit on one argument (MAX_ARG_STRLEN, 128 KiB)
and the whole command line below ARG_MAX, and the trainer reads the same members back."""
from __future__ import annotations

import os

from ratatouille_operator import manifests as M
from ratatouille_operator import planner as P
from ratatouille_operator.validation import load_crd_schema
from ratatouille_contract.jobdesc import JobDescription

from .test_planner import make_spec

MAX_ARG_STRLEN = 32 * 4096  # linux/binfmts.h: one argv or envp string
RUN = P.RunRef(namespace="n" * 63, name="r" * 40, uid="0f9a4f4e-5d7b-4c1e-9a55-6f1d3e2c8b7a")


def test_the_crd_maxima_this_test_uses():
    spec = load_crd_schema()["properties"]["spec"]["properties"]
    assert spec["finetune"]["properties"]["runs"]["maximum"] == 500
    assert spec["storage"]["properties"]["uri"]["maxLength"] == 1024


def test_the_largest_averaging_job_fits_in_one_argument():
    storage = "s3://ratatouille/" + "p" * (1024 - len("s3://ratatouille/"))
    spec = make_spec(finetune={"runs": 500, "steps": 10, "batchSize": 4, "headWarmupSteps": 1, "evalEvery": 5},
                     storage={"uri": storage}, failurePolicy={"minSucceeded": 1})
    desc = P.describe(spec, RUN, P.STAGE_AVERAGE, P.AVERAGE_MEMBER, succeeded_targets=range(500))
    action = P.CreateJob(name="r-avg-0-a1", stage=P.STAGE_AVERAGE, member=P.AVERAGE_MEMBER, attempt=1,
                         labels={}, description=desc)
    job = M.render_job(RUN, spec, action, default_image="img:1")
    container = job["spec"]["template"]["spec"]["containers"][0]
    argv = list(container["command"]) + list(container.get("args") or [])
    longest = max(len(a.encode()) for a in argv)
    total = sum(len(a.encode()) + 1 for a in argv) + sum(
        len(f"{e['name']}={e.get('value', '')}".encode()) + 1 for e in container["env"])
    print(f"\nlongest argument {longest} bytes, argv+env {total} bytes for 500 members")
    assert longest < MAX_ARG_STRLEN // 4, longest  # with room to spare
    assert total < os.sysconf("SC_ARG_MAX") // 4
    # The trainer reads back the same 500 members, with their full output URIs.
    back = JobDescription.from_json(argv[argv.index("--job-json") + 1])
    assert back.members == desc.members and len(back.members) == 500
    assert back.members[499].uri == P.member_output(spec, RUN, P.STAGE_TARGET, "499")
