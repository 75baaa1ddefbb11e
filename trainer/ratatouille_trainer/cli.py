"""``ratatouille-trainer``: the entrypoint of every child Job (and of the local executor).

    ratatouille-trainer {aux,linear-probe,target,average} (--job-json JSON | --job-file PATH)

Exit codes: 0 done (or already complete: ``DONE`` present at the output and its files verify;
one that does not verify loses ``DONE`` and the stage runs again), 2 bad input (job description,
dataset, weights, non-finite foundation weights), 3 diverged (the loss or the kept weights became
NaN/Inf: reason ``Diverged``; nothing is marked done), 1 other runtime failures. Errors are
one line on stderr (``ratatouille-trainer: error: ...``), never a traceback
(``RATATOUILLE_DEBUG=1`` shows it).
The final summary is written to ``/dev/termination-log`` when that file exists (Kubernetes).

Before it writes anything under its output prefix the trainer takes the prefix's lease
(lease.py): when another live trainer holds it, this one waits for it (up to
``RATATOUILLE_LEASE_WAIT`` seconds, default 6 hours) and then finds ``DONE``: exit 0, "already
complete", nothing trained or deleted. A wait that runs out, or a lease lost to another writer,
is exit 1 with one line naming the prefix and the holder. ``RATATOUILLE_LEASE_TTL`` (default
60 s) is how long a lease lives unrenewed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

PROG = "ratatouille-trainer"
TERMINATION_LOG = "/dev/termination-log"
_TERMINATION_MAX = 4000
EXIT_DIVERGED = 3  # the local executor reports it as reason Diverged


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise _BadInput(message)


class _BadInput(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    from ratatouille_contract.jobdesc import STAGES

    p = _Parser(prog=PROG, description="Run one stage of a RatatouilleRun (a child Job's work).")
    p.add_argument("stage", choices=STAGES)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--job-json", help="the job description (JSON)")
    g.add_argument("--job-file", help="a file holding the job description (JSON)")
    return p


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split()) or "unknown error"


def _error(msg: str, code: int, reason: str | None = None) -> int:
    line = f"{PROG}: error: {_one_line(msg)}"
    print(line, file=sys.stderr, flush=True)
    _termination({"error": _one_line(msg), "exitCode": code, **({"reason": reason} if reason else {})})
    return code


def _termination(payload: dict) -> None:
    path = os.environ.get("RATATOUILLE_TERMINATION_LOG", TERMINATION_LOG)
    if not path or not os.path.exists(path) or not os.access(path, os.W_OK):
        return
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str)
    if len(text) > _TERMINATION_MAX:
        slim = {k: payload[k] for k in ("stage", "member", "valAccuracy", "testAccuracy",
                                         "sha256", "error", "exitCode", "reason", "retrained") if k in payload}
        text = json.dumps(slim, separators=(",", ":"), sort_keys=True, default=str)[:_TERMINATION_MAX]
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass


def _load_description(args):
    from ratatouille_contract.jobdesc import JobDescription, JobDescriptionError

    if args.job_file is not None:
        try:
            with open(args.job_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise JobDescriptionError(f"cannot read job file {args.job_file}: {e.strerror}") from None
    else:
        text = args.job_json
    desc = JobDescription.from_json(text)
    if desc.stage != args.stage:
        raise JobDescriptionError(f"subcommand {args.stage!r} does not match the job description's "
                                  f"stage {desc.stage!r}")
    return desc


def _complete(desc, note: str = "") -> int:
    from ratatouille_contract.layout import done_uri

    print(json.dumps({"event": "complete", "stage": desc.stage, "member": desc.member,
                      "message": "already complete"}), flush=True)
    print(f"{PROG}: {desc.stage} {desc.member}: already complete ({done_uri(desc.output)} exists{note})",
          file=sys.stderr, flush=True)
    return 0


def _run(desc) -> int:
    """Run ``desc``'s stage under its member's lease, unless its output is already a current,
    verified result (then say so and write nothing)."""
    from . import inputs, integrity, stages
    from .lease import Lease
    from .storage import open_storage

    storage = open_storage(desc.output, desc.storage_endpoint)
    # An auxiliary cache entry is reused only if it was computed from the same content as the
    # inputs have now (inputs.py), not just from the same URIs.
    ident = inputs.of_description(storage, desc)

    def problem() -> str | None:
        """Why a finished result must be redone (None: current and verified, or unfinished)."""
        why = integrity.problem(storage, desc.output)
        if why is None and ident is not None and storage.is_done(desc.output):
            why = inputs.changed(storage, desc.output, ident)
        return why

    if storage.is_done(desc.output) and problem() is None:
        return _complete(desc)  # a cache hit needs no lease: nothing is written
    try:
        lease = Lease(storage, desc.output, stage=desc.stage, member=desc.member)
    except ValueError as e:  # RATATOUILLE_LEASE_TTL / _WAIT
        return _error(str(e), 2)
    with lease:
        redone = problem()
        if redone is not None:
            integrity.discard(storage, desc.output, redone, what=f"{desc.stage} {desc.member}")
        elif storage.is_done(desc.output):  # finished by the writer we waited for
            return _complete(desc, ", written by another trainer meanwhile")
        if ident is not None:
            inputs.record(storage, desc.output, ident)
        metrics = stages.run_stage(desc, lease=lease)
    summary = stages.summary(metrics)
    if redone is not None:
        # Why a finished result was trained again (its inputs changed, or it did not verify):
        # the operator turns this into an Event of the run, the local executor prints it.
        summary["retrained"] = redone[:500]
    print(json.dumps({"event": "result", **summary}, default=str), flush=True)
    _termination(summary)
    return 0


def _failure(e: BaseException, debug: bool) -> int:
    """One line on stderr and the exit code for a stage that raised ``e``: 2 for bad input (the
    description, data, weights, device), 1 for runtime failures (retried), EXIT_DIVERGED."""
    from .averaging import AveragingError, UnsafeWeightsError
    from .data import DataError
    from .device import DeviceError
    from ratatouille_contract.jobdesc import JobDescriptionError
    from .lease import LeaseBusy, LeaseLost
    from .models import ModelError
    from .storage import NotFound, StorageError
    from .training import Diverged

    if isinstance(e, KeyboardInterrupt):
        return _error("interrupted", 130)
    if isinstance(e, (LeaseBusy, LeaseLost)):
        return _error(str(e), 1)
    if isinstance(e, MemoryError):
        return _error("out of memory", 1)
    if debug:
        traceback.print_exception(e)
    if isinstance(e, Diverged):
        return _error(f"Diverged: {e}", EXIT_DIVERGED, reason="Diverged")
    if isinstance(e, (JobDescriptionError, DataError, UnsafeWeightsError, ModelError, AveragingError,
                      DeviceError, NotFound)):
        return _error(str(e), 2)
    if isinstance(e, StorageError):
        return _error(f"storage: {e}", 1)
    return _error(f"{type(e).__name__}: {e}", 1)  # runtime failure: still one line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("RATATOUILLE_DEBUG", "") in ("1", "true", "yes")
    try:
        args = _parser().parse_args(argv)
    except _BadInput as e:
        return _error(str(e), 2)

    from ratatouille_contract.jobdesc import JobDescriptionError

    try:
        desc = _load_description(args)
    except JobDescriptionError as e:
        return _error(f"invalid job description: {e}", 2)
    try:
        return _run(desc)
    except (KeyboardInterrupt, Exception) as e:
        return _failure(e, debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
