"""The `ratatouille` command line: run, validate and plan RatatouilleRuns, average checkpoints,
start the operator (a development cluster is `make dev-cluster`, outside the product).

Errors in user input end with one line naming what is wrong and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .spec import SpecError

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
MAX_LOCAL_PARALLELISM = 256  # the CRD's maximum of spec.parallelism


def _fail(message: str, code: int = EXIT_INVALID) -> int:
    print(f"ratatouille: error: {message}", file=sys.stderr)
    return code


# -- manifests -----------------------------------------------------------------------------
def _is_plain_path(value: Any) -> bool:
    return isinstance(value, str) and value != "" and "://" not in value


def localize_paths(doc: dict, base: Path) -> dict:
    """Embedded mode only: plain relative paths in a manifest are relative to the working
    directory; make them absolute (storage becomes a file:// URI) before validation."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return doc

    def fix(obj: Any, key: str, as_uri: bool = False) -> None:
        if isinstance(obj, dict) and _is_plain_path(obj.get(key)):
            path = (base / obj[key]).resolve()
            obj[key] = path.as_uri() if as_uri else str(path)

    fix(spec.get("foundation"), "weights")
    fix(spec.get("target"), "dataset")
    for aux in spec.get("auxiliaries") or []:
        fix(aux, "dataset")
        fix(aux, "weights")
    fix(spec.get("storage"), "uri", as_uri=True)
    return doc


def load(path: str, overrides: Sequence[str], *, embedded: bool):
    from . import validation

    doc = validation.read_manifest_file(path)
    if overrides:
        doc = validation.apply_overrides(doc, list(overrides))
    if embedded:
        doc = localize_paths(doc, Path.cwd())
    return validation.validate_manifest(doc)


# -- display -------------------------------------------------------------------------------
class Display:
    """Live progress for `ratatouille run`: a redrawn line on a terminal, event lines otherwise."""

    def __init__(self, stream=sys.stdout, quiet: bool = False):
        self.stream = stream
        self.tty = stream.isatty()
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.last_line = 0.0
        self.executor = None

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f}s]"

    def _print(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, kind: str, data: dict) -> None:
        if self.quiet:
            return
        if kind == "started":
            job = data["job"]
            self._print(f"{self._stamp()} started  {job.stage}/{job.member} (attempt {job.attempt})")
        elif kind == "finished":
            job = data["job"]
            if job.state == "Succeeded":
                self._print(f"{self._stamp()} done     {job.stage}/{job.member}")
            else:
                self._print(f"{self._stamp()} FAILED   {job.stage}/{job.member} attempt {job.attempt} ({job.reason})")
                for line in data.get("tail") or []:
                    self._print(f"           | {line}")
        elif kind == "event":
            ev = data["event"]
            mark = "!" if ev.type == "Warning" else "*"
            self._print(f"{self._stamp()} {mark} {ev.reason}: {ev.message}")
        elif kind == "progress":
            now = time.monotonic()
            if now - self.last_line < (0.5 if self.tty else 10.0):
                return
            self.last_line = now
            line = self.progress_line(data)
            if self.tty:
                self.stream.write("\r\033[K" + line[: os.get_terminal_size().columns - 1])
                self.stream.flush()
            else:
                self._print(line)

    def progress_line(self, data: dict) -> str:
        p = data["progress"]
        status = self.executor.status if self.executor is not None else {}
        loss = p.get("loss")
        loss_s = f" loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
        return (f"{self._stamp()} {status.get('phase', 'Pending'):<9} jobs {status.get('progress', '?'):>5}"
                f"  {p.get('stage')}/{p.get('member')} step {p.get('step')}/{p.get('steps')}{loss_s}")


def _num(v, signed: bool = False) -> str:
    """A diagnostic number (the status holds them as 4-decimal strings) for the table."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def diagnostics_lines(diag: dict) -> list[str]:
    """The averaging diagnostics under the results table (their meaning: README, "Averaging
    diagnostics"); empty when the average wrote none."""
    lines: list[str] = []
    uni = diag.get("uniform") or {}
    if uni:
        lines.append("")
        text = (f"uniform average val {uni.get('valAccuracy')} vs members mean {uni.get('membersMeanVal')}"
                f" / best {uni.get('membersBestVal')}")
        if "gain" in uni:
            text += (f": gain {_num(uni.get('gain'), True)}, gap to best {_num(uni.get('gapToBest'), True)},"
                     f" collapse {uni.get('collapseGrade')} (margin {_num(uni.get('collapseMargin'))}"
                     f" on {uni.get('valImages')} images)")
        lines.append(text)
    ens = diag.get("ensemble") or {}
    if ens:
        lines.append(f"functional ensemble val {_num(ens.get('valAccuracy'))}, member prediction"
                     f" disagreement {_num(ens.get('disagreement'))}")
    conv = diag.get("convergence") or {}
    if conv.get("members"):
        lines.append(f"members best at their last evaluation: {conv.get('bestAtLast')} of {conv.get('members')}")
    it = diag.get("interpolation") or {}
    for p in it.get("pairs") or ([it] if it.get("barrier") is not None else []):
        what = "same hyperparameters" if p.get("kind") == "twins" else "farthest pair"
        lines.append(f"interpolation {p.get('a')} ({p.get('sourceA')}) -> {p.get('b')} ({p.get('sourceB')}),"
                     f" {what}: barrier {_num(p.get('barrier'))}")
    sources = diag.get("sources") or {}
    if sources:
        head = ["init source", "members", "mean val", "featurizer relL2", "members relL2",
                "uniform without", "change"]
        rows = [[str(name), str(r.get("members", "")), _num(r.get("meanVal")), _num(r.get("featurizerRelL2")),
                 _num(r.get("membersRelL2")), _num(r.get("leaveOutVal")), _num(r.get("leaveOutGain"), True)]
                for name, r in sorted(sources.items()) if isinstance(r, dict)]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines += ["", fmt.format(*head)] + [fmt.format(*r) for r in rows]
    warnings = [w for w in diag.get("warnings") or [] if isinstance(w, dict)]
    if warnings:
        lines.append("")
        lines += [f"WARNING ({w.get('code')}): {w.get('message')}" for w in warnings]
    elif uni.get("collapse") and "collapseGrade" not in uni:  # an average from an older trainer
        lines.append("WARNING: the uniform average collapsed below its members: they are not linearly"
                     " mode connected (lower the learning rates or use greedy selection)")
    return lines


def results_table(status: dict) -> str:
    result = status.get("result") or {}
    if not result:
        return ""
    domains = sorted((result.get("testAccuracy") or {}).keys())
    header = ["model", "members", "val"] + [f"test:{d}" for d in domains]
    rows = [[f"averaged ({result.get('selection')})", str(result.get("members", "")),
             str(result.get("valAccuracy", ""))] + [str(result["testAccuracy"].get(d, "")) for d in domains]]
    best = result.get("bestSingle") or {}
    if best:
        rows.append([f"best single ({best.get('member')})", "1", str(best.get("valAccuracy", ""))]
                    + [str((best.get("testAccuracy") or {}).get(d, "")) for d in domains])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in rows]
    lines += diagnostics_lines(result.get("diagnostics") or {})
    lines.append("")
    lines.append(f"model: {result.get('model')}")
    return "\n".join(lines)


# -- commands ------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    run = load(args.manifest, args.set, embedded=True)
    print(f"{args.manifest}: valid RatatouilleRun {run.namespace}/{run.name}")
    return EXIT_OK


def cmd_plan(args) -> int:
    from . import planner
    from ratatouille_contract import layout

    from .executor import embedded_uid

    run = load(args.manifest, args.set, embedded=True)
    ref = planner.RunRef(namespace=run.namespace, name=run.name,
                         uid=embedded_uid(run.namespace, run.name, run.spec.raw))
    graph = planner.job_graph(run.spec, ref)
    if args.output == "json":
        print(json.dumps(graph, indent=2))
        return EXIT_OK
    print(f"RatatouilleRun {run.namespace}/{run.name}  storage {layout.run_prefix(run.spec.storage.uri, ref)}")
    for node in graph:
        needs = ", ".join(node["needs"]) or "-"
        extra = f"  [{node['note']}]" if node.get("note") else ""
        print(f"  {node['stage']:<12} {node['member']:<14} needs {needs}{extra}")
    return EXIT_OK


def cmd_run(args) -> int:
    from ratatouille_trainer.storage import open_storage

    from .executor import LocalExecutor

    run = load(args.manifest, args.set, embedded=True)
    storage = open_storage(run.spec.storage.uri, endpoint=run.spec.storage.endpoint)
    workdir = Path(args.workdir or os.path.join(".ratatouille", run.namespace, run.name))
    display = Display(quiet=args.quiet)
    executor = LocalExecutor(run.namespace, run.name, run.spec, storage=storage, workdir=workdir,
                             parallelism=args.parallelism, on_event=display)
    display.executor = executor
    print(f"RatatouilleRun {run.namespace}/{run.name} (uid {executor.run.uid})")
    print(f"storage {executor.prefix}   logs {workdir / 'logs'}")
    try:
        status = executor.run_to_completion(timeout=args.timeout)
    except KeyboardInterrupt:
        print("\ninterrupted: finished members are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except TimeoutError:
        return _fail(f"run did not finish within --timeout {args.timeout:g} s: finished members are kept; "
                     "run the same command again to resume", EXIT_FAILED)
    phase = status.get("phase")
    print()
    table = results_table(status)
    if table:
        print(table)
    cond = {c.get("type"): c for c in status.get("conditions") or []}
    if phase == "Succeeded":
        print(f"RatatouilleRun {run.name} Succeeded ({status.get('progress')} jobs)")
        return EXIT_OK
    failed = cond.get("Failed") or {}
    print(f"RatatouilleRun {run.name} {phase}: {failed.get('reason', '')} {failed.get('message', '')}".rstrip())
    return EXIT_FAILED


def _number_arg(convert, check, what: str):
    """An argparse type: `convert` the text, then refuse it unless `check(value)` (`what` says
    what is expected), so a bad value is one usage line (exit 2), never a hang or a traceback."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


_parallelism_arg = _number_arg(int, lambda v: 1 <= v <= MAX_LOCAL_PARALLELISM,
                               f"an integer from 1 to {MAX_LOCAL_PARALLELISM}")
_seconds_arg = _number_arg(float, lambda v: 0 < v < float("inf"), "a positive number of seconds")


def cmd_average(args) -> int:
    # The streaming path reads safetensors with numpy: no torch import (~650 MB less memory).
    from ratatouille_trainer.averaging import average_uris

    summary = average_uris(args.output, args.inputs, endpoint=args.endpoint)
    print(f"averaged {summary['count']} checkpoints into {args.output} (sha256 {summary['sha256']})")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    # Scoring needs torch and timm: the trainer's process does it (this package never imports them).
    import subprocess

    return subprocess.call([sys.executable, "-m", "ratatouille_trainer.export", *args.args])


def cmd_operator(args) -> int:
    from .main import run_operator

    return run_operator(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratatouille", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def manifest_cmd(name: str, help_: str):
        p = sub.add_parser(name, help=help_)
        p.add_argument("manifest", help="RatatouilleRun YAML file")
        p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                       help="override a field, e.g. --set spec.finetune.runs=2 (repeatable)")
        return p

    p = manifest_cmd("run", "run a RatatouilleRun on this machine (embedded mode)")
    p.add_argument("--parallelism", type=_parallelism_arg, default=None,
                   help="local processes at once (default: spec.parallelism)")
    p.add_argument("--workdir", default=None, help="where logs go (default .ratatouille/<namespace>/<name>)")
    p.add_argument("--timeout", type=_seconds_arg, default=None,
                   help="give up after this many seconds (exit 1; a re-run resumes)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_run)
    manifest_cmd("validate", "check a manifest against the CRD schema and semantic rules").set_defaults(func=cmd_validate)
    p = manifest_cmd("plan", "print the job graph without running it")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("average", help="uniformly average compatible safetensors checkpoints (paths or URIs)")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL for s3:// URIs")
    p.set_defaults(func=cmd_average)
    p = sub.add_parser("evaluate", add_help=False,
                       help="score a published model on a DomainBed-layout dataset, per domain "
                            "(MODEL DATASET [--model-name A] [--input-size N] [-o json])")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("operator", help="start the Kubernetes operator")
    p.add_argument("--namespace", "-n", action="append", default=[], help="watch only these namespaces")
    p.add_argument("--all-namespaces", "-A", action="store_true", help="watch the whole cluster")
    p.add_argument("--standalone", action="store_true", default=True)
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from ratatouille_trainer.storage import StorageError

    bad_input: tuple = (SpecError,)
    if args.command == "average":
        from ratatouille_trainer.weights import AveragingError, UnsafeWeightsError
        bad_input += (AveragingError, UnsafeWeightsError)
    try:
        return args.func(args)
    except bad_input as e:
        return _fail(str(e))
    except FileNotFoundError as e:
        return _fail(f"{e.filename}: no such file" if e.filename else str(e))
    except StorageError as e:
        return _fail(str(e), EXIT_FAILED)
    except BrokenPipeError:
        # The reader went away (`ratatouille plan ... | head`), as for any Unix filter: no
        # traceback, and nothing more written to the closed pipe (not even at exit's flush).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
