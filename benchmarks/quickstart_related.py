"""Does the quickstart make a better first run with auxiliaries related to its digits (issue 13)?

Decision rule, fixed before any run:
    Both configurations run the quickstart (crds/examples/quickstart.yaml, unchanged but for its
    auxiliaries, its seed and where its data and storage are) for seeds 0, 1, 2 (only `spec.seed`
    changes):
      * `today`:   the quickstart's auxiliaries `rot4` and `shapes` (demo_data);
      * `related`: `handwritten` and `printed`, rendered from Debian fonts by
                   benchmarks/domainbed_mini/data_v2.py's makers, 300 images per domain (the
                   demo's per-domain size); the target stays the demo's `digits`.
    The quickstart switches to the related auxiliaries only if
      (a) the related configuration's averaged model (greedy, as the quickstart prints it) has a
          higher mean test accuracy on the held-out `rotated` domain over the 3 seeds than today's,
      (b) its mean over seeds of (averaged minus best single member) test accuracy on `rotated` is
          not lower than today's, and
      (c) its wall time for seed 0 on a quiet machine, building all its data from an empty data
          folder (demo_data's datasets, then the related ones) and running `ratatouille run`, is
          under 10 minutes (600 s).
    Every number is reported whatever the outcome.

Usage (from the repository root):
    .venv/bin/python benchmarks/quickstart_related.py                  # accuracy runs, all seeds, both configs
    .venv/bin/python benchmarks/quickstart_related.py --timing --quiet-machine   # rule (c): seed 0 of each
                                                                       # config from empty folders, nothing else running
    .venv/bin/python benchmarks/quickstart_related.py --seeds 1 --configs related   # part of it again
    .venv/bin/python benchmarks/quickstart_related.py --build-data DIR # only render the related auxiliaries into DIR

Everything goes under --work (default /tmp/qs-related): data/, specs/, runs/<config>-s<seed>/ (the
run's storage), logs/. Finished runs are skipped (a re-run resumes an unfinished one: `ratatouille
run` keeps finished members). Results: benchmarks/results/quickstart-related.json (merged with the
runs it already holds), and a table on stdout.

The runs use a snapshot of the committed product (`git archive <commit> operator trainer`, as
benchmarks/domainbed_mini/run.py does), so work in progress in the working tree cannot change them.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DBM = HERE / "domainbed_mini"
QUICKSTART = REPO / "crds/examples/quickstart.yaml"
RESULTS = HERE / "results" / "quickstart-related.json"
HELD_OUT = "rotated"
AUX_PER_DOMAIN = 300          # the demo's per-domain size (demo_data.DEFAULT_PER_DOMAIN)
DATA_SEED = 0                 # the demo's data seed
RELATED = ("handwritten", "printed")
CONFIGS = {"today": None, "related": RELATED}   # None: the quickstart's own auxiliaries
SEEDS = (0, 1, 2)
TIME_LIMIT_S = 600.0
RULE = [
    "(a) related: mean over seeds 0, 1, 2 of the greedy average's test accuracy on `rotated` higher than today's",
    "(b) related: mean over seeds of (greedy average - best single member) test on `rotated` not lower than today's",
    "(c) related: seed-0 wall time on a quiet machine, data built from an empty folder + `ratatouille run`, < 600 s",
    "switch to the related auxiliaries only if (a), (b) and (c) all hold",
]
ALLOWED_CHANGES = {("spec", "auxiliaries"), ("spec", "seed"), ("spec", "target", "dataset"), ("spec", "storage", "uri")}
EPS = 1e-12


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------ spec variants (pure)

def variant(base: dict, config: str, seed: int, data: str, storage: str) -> dict:
    """The quickstart manifest `base` with only its auxiliaries (for `related`), its seed, and the
    folders of its data and storage changed. `today` keeps the quickstart's auxiliary names and
    only moves their datasets under `data`."""
    spec = copy.deepcopy(base)
    s = spec["spec"]
    s["seed"] = int(seed)
    s["target"]["dataset"] = f"{data}/{Path(base['spec']['target']['dataset']).name}"
    names = CONFIGS[config]
    if names is None:
        s["auxiliaries"] = [dict(a, dataset=f"{data}/{Path(a['dataset']).name}") for a in base["spec"]["auxiliaries"]]
    else:
        s["auxiliaries"] = [{"name": n, "dataset": f"{data}/{n}"} for n in names]
    s["storage"]["uri"] = storage
    return spec


def changed_paths(a, b, path=()) -> set[tuple]:
    """The paths (key tuples) where two YAML-like trees differ (lists compared whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[tuple] = set()
        for k in set(a) | set(b):
            if k not in a or k not in b:
                out.add(path + (k,))
            else:
                out |= changed_paths(a[k], b[k], path + (k,))
        return out
    return set() if a == b else {path}


# ------------------------------------------------------------------------ decision rule (pure)

def decide(runs: dict, timing: dict | None, seeds=SEEDS) -> dict:
    """Apply the rule to runs[config][str(seed)] records (greedy.test, bestSingle.test) and the
    timing record of the related configuration ({"related": {"totalSeconds", "quiet"}})."""
    def complete(cfg):
        return all(str(s) in runs.get(cfg, {}) for s in seeds)

    if not (complete("today") and complete("related")):
        return {"verdict": "incomplete", "why": "not every seed of both configurations has finished"}

    def mean(cfg, f):
        return statistics.fmean(f(runs[cfg][str(s)]) for s in seeds)

    def greedy(r):
        return r["greedy"]["test"]

    def margin(r):
        return r["greedy"]["test"] - r["bestSingle"]["test"]

    a = {"today": mean("today", greedy), "related": mean("related", greedy)}
    b = {"today": mean("today", margin), "related": mean("related", margin)}
    t = (timing or {}).get("related") or {}
    out = {
        "a": {"meanGreedyTest": a, "holds": a["related"] - a["today"] > EPS},
        "b": {"meanGreedyMinusBest": b, "holds": b["related"] - b["today"] >= -EPS},
        "c": {"seconds": t.get("totalSeconds"), "quiet": t.get("quiet"),
              "holds": (t.get("totalSeconds") is not None and bool(t.get("quiet"))
                        and t["totalSeconds"] < TIME_LIMIT_S) if t else None},
    }
    if not out["a"]["holds"] or not out["b"]["holds"] or out["c"]["holds"] is False:
        out["verdict"] = "keep"
    elif out["c"]["holds"] is None:
        out["verdict"] = "incomplete"
        out["why"] = "(a) and (b) hold; (c) has no quiet-machine timing yet"
    else:
        out["verdict"] = "switch"
    return out


# ------------------------------------------------------------------------ data

def build_related(out: Path) -> dict:
    """Render the related auxiliaries into `out` with data_v2's makers (the demo's target is not
    touched); summary in out/related-data.json."""
    sys.path.insert(0, str(DBM))
    import data_v2
    from ratatouille_trainer import demo_data as dd

    t0 = time.time()
    fonts = data_v2.resolve_fonts(RELATED)
    counts = {}
    for aux, domains in fonts.items():
        shutil.rmtree(out / aux, ignore_errors=True)
        counts[aux] = {dom: dd._write_domain(out / aux / dom, dd.DIGIT_CLASSES,
                                             data_v2._font_domain(fs, AUX_PER_DOMAIN, dd._rng(DATA_SEED, aux, dom), dom))
                       for dom, fs in domains.items()}
    summary = {"seed": DATA_SEED, "auxPerDomain": AUX_PER_DOMAIN, "counts": counts,
               "fonts": {a: {d: [f"{os.path.basename(p)}:U+{cp:04X}" for p, cp in fs] for d, fs in doms.items()}
                         for a, doms in fonts.items()},
               "seconds": round(time.time() - t0, 2)}
    (out / "related-data.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def checks(data: Path) -> dict:
    """Pixel-hash disjointness of every auxiliary from the demo's target (all 4 rotations), and the
    related fonts against the foundation's pretraining fonts: domainbed_mini's own checks."""
    sys.path.insert(0, str(DBM))
    import data_v2
    import run as dbm  # benchmarks/domainbed_mini/run.py (stdlib imports only at module level)
    from safetensors import safe_open

    pixel = dbm.check_disjoint(data, ("rot4", "shapes") + RELATED)
    with safe_open(str(REPO / "crds/examples/quickstart-foundation.safetensors"), "pt") as f:
        pretrained = [x for x in ((f.metadata() or {}).get("fonts") or "").split(",") if x]
    fonts = data_v2.font_report(data_v2.resolve_fonts(RELATED), pretrained)
    fonts.pop("files", None)
    return {"pixel": pixel, "fonts": fonts}


def env_for(snap: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if snap:
        env["PYTHONPATH"] = os.pathsep.join([str(snap / "operator"), str(snap / "trainer")]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def build_demo_data(data: Path, env: dict) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "ratatouille_trainer.demo_data", "--out", str(data), "--data-only"],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def build_related_subprocess(data: Path, env: dict) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-data", str(data)],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


# ------------------------------------------------------------------------ runs

def write_spec(work: Path, config: str, seed: int, data: Path, storage: Path, tag: str = "") -> Path:
    import yaml

    base = yaml.safe_load(QUICKSTART.read_text())
    spec = variant(base, config, seed, str(data), str(storage))
    assert changed_paths(base, spec) <= ALLOWED_CHANGES, changed_paths(base, spec)
    path = work / "specs" / f"{config}-s{seed}{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# generated by benchmarks/quickstart_related.py from crds/examples/quickstart.yaml\n"
                    + yaml.safe_dump(spec, sort_keys=False))
    return path


def run_prefix(storage: Path) -> Path | None:
    found = sorted(storage.glob("*/*/*/average/DONE"))
    if len(found) > 1:
        raise RuntimeError(f"{storage}: more than one finished run: {found}")
    return found[0].parent.parent if found else None


def ratatouille_run(spec: Path, logdir: Path, env: dict) -> tuple[int, float, str]:
    logdir.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("ratatouille"))
    t0 = time.monotonic()
    with open(logdir / "run.log", "a") as fh:
        rc = subprocess.call([exe, "run", str(spec), "--workdir", str(logdir)], cwd=REPO, env=env,
                             stdout=fh, stderr=subprocess.STDOUT)
    return rc, time.monotonic() - t0, str(logdir / "run.log")


def cli_table(log_path: Path) -> list[str]:
    """The results table and diagnostics `ratatouille run` printed last (from its header line to
    the `model:` line)."""
    lines = log_path.read_text(errors="replace").splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("model ") and "members" in ln]
    if not starts:
        return []
    out = []
    for ln in lines[starts[-1]:]:
        if ln.startswith("model: "):
            break
        out.append(ln)
    while out and not out[-1].strip():
        out.pop()
    return out


def uniform_test(prefix: Path, data: Path, seed: int, runs: int, product_val: float) -> float:
    """Test accuracy on the held-out domain of the uniform average of every member, with the
    product's own averaging and evaluation code; its validation must equal the product's
    `uniform.valAccuracy` diagnostic."""
    import torch
    from safetensors.torch import load_file

    from ratatouille_trainer.averaging import RunningSum
    from ratatouille_trainer.data import load_dataset
    from ratatouille_trainer.device import select_device
    from ratatouille_trainer.models import build_network, freeze_bn, load_network_state
    from ratatouille_trainer.training import Evaluator, test_accuracies

    ds = load_dataset(str(data / "digits"), 32, test_domains=[HELD_OUT], holdout_fraction=0.2, split_seed=seed)
    ctx = select_device()
    net = freeze_bn(build_network("test_resnet", ds.num_classes, 0.0, 32))
    ctx.prepare(net)
    net.eval()
    rs = RunningSum()
    members = sorted((p for p in (prefix / "target").iterdir() if (p / "model.safetensors").exists()),
                     key=lambda p: int(p.name))
    assert len(members) == runs, (prefix, len(members))
    for m in members:
        rs.add(m.name, load_file(str(m / "model.safetensors")))
    with torch.no_grad():
        load_network_state(net, rs.mean(), "uniform average")
        val = Evaluator(ds.validation_sets(), ctx).score(net).pooled
        test = test_accuracies(net, ds.test_domain_list, ctx)[HELD_OUT]
    if abs(val - product_val) > 1e-9:
        raise RuntimeError(f"{prefix}: uniform average recomputed scores {val} pooled validation, "
                           f"the product's diagnostic says {product_val}")
    return float(test)


def parse_run(prefix: Path, storage: Path, data: Path, seed: int, log_path: Path) -> dict:
    avg = json.loads((prefix / "average" / "metrics.json").read_text())
    members = []
    for p in sorted((prefix / "target").iterdir(), key=lambda p: int(p.name)):
        m = json.loads((p / "metrics.json").read_text())
        members.append({"index": int(p.name), "source": m.get("source"), "val": m.get("valAccuracy"),
                        "test": (m.get("testAccuracy") or {}).get(HELD_OUT), "bestStep": m.get("bestStep"),
                        "hyperparameters": m.get("hyperparameters")})
    aux = {}
    for p in sorted((storage / "cache" / "aux").glob("*/metrics.json")):
        m = json.loads(p.read_text())
        aux[str(m.get("member") or p.parent.name)] = {"valAccuracy": m.get("valAccuracy"), "key": p.parent.name}
    uni = avg.get("uniform") or {}
    best = avg.get("bestSingle") or {}
    ens = avg.get("ensemble") or {}
    conv = avg.get("convergence") or {}
    inter = avg.get("interpolation") or {}
    rec = {
        "prefix": str(prefix),
        "greedy": {"members": avg.get("members"), "selected": avg.get("selected"), "val": avg.get("valAccuracy"),
                   "test": (avg.get("testAccuracy") or {}).get(HELD_OUT)},
        "bestSingle": {"member": best.get("member"), "source": best.get("source"), "val": best.get("valAccuracy"),
                       "test": (best.get("testAccuracy") or {}).get(HELD_OUT)},
        "uniform": {"val": uni.get("valAccuracy"), "membersMeanVal": uni.get("membersMeanVal"),
                    "membersBestVal": uni.get("membersBestVal"), "gain": uni.get("gain"),
                    "gapToBest": uni.get("gapToBest"), "collapseGrade": uni.get("collapseGrade"),
                    "collapseMargin": uni.get("collapseMargin"), "valImages": uni.get("valImages")},
        "ensemble": {"val": ens.get("valAccuracy"), "disagreement": ens.get("disagreement")},
        "convergence": {"bestAtLast": conv.get("bestAtLast"), "members": conv.get("members")},
        "interpolation": [{"a": p.get("a"), "sourceA": p.get("sourceA"), "b": p.get("b"), "sourceB": p.get("sourceB"),
                           "kind": p.get("kind"), "barrier": p.get("barrier")}
                          for p in (inter.get("pairs") or ([inter] if inter else []))],
        "sources": avg.get("sources"),
        "warnings": [w.get("code") for w in avg.get("diagnosticWarnings") or [] if isinstance(w, dict)],
        "members": members,
        "membersMeanTest": statistics.fmean(m["test"] for m in members),
        "auxiliaries": aux,
        "cliTable": cli_table(log_path) if log_path.exists() else [],
    }
    rec["greedyMinusBestTest"] = rec["greedy"]["test"] - rec["bestSingle"]["test"]
    rec["uniform"]["test"] = uniform_test(prefix, data, seed, len(members), uni.get("valAccuracy"))
    return rec


def product_snapshot(work: Path, rev: str) -> tuple[str | None, Path | None]:
    sys.path.insert(0, str(DBM))
    import run as dbm

    return dbm.product_snapshot(work, rev)


# ------------------------------------------------------------------------ report

def fmt(x, signed=False, nd=3):
    if x is None:
        return "n/a"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def table(runs: dict) -> str:
    head = ["config", "seed", "greedy members", "greedy val", "greedy test", "best single (src) test",
            "greedy-best", "uniform val", "uniform test", "gain (val)", "ens. val", "disagree", "members mean test"]
    rows = []
    for cfg in CONFIGS:
        recs = runs.get(cfg, {})
        for s in sorted(recs, key=int):
            r = recs[s]
            rows.append([cfg, s, str(r["greedy"]["members"]), fmt(r["greedy"]["val"]), fmt(r["greedy"]["test"]),
                         f"{fmt(r['bestSingle']['test'])} ({r['bestSingle']['member']}, {r['bestSingle']['source']})",
                         fmt(r["greedyMinusBestTest"], True), fmt(r["uniform"]["val"]), fmt(r["uniform"]["test"]),
                         fmt(r["uniform"]["gain"], True, 4), fmt(r["ensemble"]["val"]),
                         fmt(r["ensemble"]["disagreement"], nd=4), fmt(r["membersMeanTest"])])
        if recs:
            vals = list(recs.values())

            def m(f):
                return statistics.fmean(f(r) for r in vals)
            rows.append([cfg, f"mean({len(vals)})", fmt(m(lambda r: r["greedy"]["members"]), nd=1),
                         fmt(m(lambda r: r["greedy"]["val"])), fmt(m(lambda r: r["greedy"]["test"])),
                         fmt(m(lambda r: r["bestSingle"]["test"])), fmt(m(lambda r: r["greedyMinusBestTest"]), True),
                         fmt(m(lambda r: r["uniform"]["val"])), fmt(m(lambda r: r["uniform"]["test"])),
                         fmt(m(lambda r: r["uniform"]["gain"]), True, 4), fmt(m(lambda r: r["ensemble"]["val"])),
                         fmt(m(lambda r: r["ensemble"]["disagreement"]), nd=4), fmt(m(lambda r: r["membersMeanTest"]))])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    f = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([f.format(*head), f.format(*["-" * w for w in widths])] + [f.format(*r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qs-related"))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--timing", action="store_true", help="rule (c): seed 0 of each config from empty folders "
                   "(run it on a quiet machine)")
    p.add_argument("--quiet-machine", action="store_true", help="with --timing: nothing else runs on this "
                   "machine (recorded; rule (c) counts only such a timing)")
    p.add_argument("--build-data", type=Path, metavar="DIR", help="only render the related auxiliaries into DIR")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--product-commit", default="HEAD")
    p.add_argument("--no-snapshot", action="store_true", help="run the working tree's product code")
    a = p.parse_args(argv)
    if a.build_data:
        print(json.dumps(build_related(a.build_data.resolve())["counts"]))
        return 0
    seeds = [int(s) for s in a.seeds.split(",") if s]
    configs = [c for c in a.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r} (choose from {', '.join(CONFIGS)})")
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    commit, snap = (None, None) if a.no_snapshot else product_snapshot(work, a.product_commit)
    if snap:
        sys.path[:0] = [str(snap / "operator"), str(snap / "trainer")]
    env = env_for(snap)
    from common import machine  # benchmarks/common.py

    report = json.loads(a.results.read_text()) if a.results.exists() else {}
    report.update({"rule": RULE, "quickstart": str(QUICKSTART.relative_to(REPO)), "heldOut": HELD_OUT,
                   "related": list(RELATED), "auxPerDomain": AUX_PER_DOMAIN, "dataSeed": DATA_SEED})
    report.setdefault("runs", {})
    report.setdefault("timing", {})

    def save():
        report["decision"] = decide(report["runs"], report["timing"])
        a.results.parent.mkdir(parents=True, exist_ok=True)
        a.results.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")

    if a.timing:
        for cfg in configs:
            root = work / "timing" / f"{cfg}-s0"
            shutil.rmtree(root, ignore_errors=True)
            data, storage = root / "data", root / "runs"
            spec = write_spec(work, cfg, 0, data, storage, tag="-timing")
            m0 = machine()
            log(f"timing {cfg}: machine {m0['load']} niceness {os.nice(0)}")
            t0 = time.monotonic()
            t_demo = build_demo_data(data, env)
            t_rel = build_related_subprocess(data, env) if CONFIGS[cfg] else 0.0
            rc, t_run, log_path = ratatouille_run(spec, root / "logs", env)
            total = time.monotonic() - t0
            m1 = machine()
            rec = {"demoDataSeconds": round(t_demo, 1), "relatedDataSeconds": round(t_rel, 1),
                   "runSeconds": round(t_run, 1), "totalSeconds": round(total, 1), "rc": rc,
                   "machineBefore": m0, "machineAfter": m1, "niceness": os.nice(0), "commit": commit,
                   # quiet: the caller vouches that nothing else ran (--quiet-machine), and not niced
                   "quiet": bool(a.quiet_machine) and os.nice(0) == 0}
            prefix = run_prefix(storage)
            if rc == 0 and prefix:
                avg = json.loads((prefix / "average" / "metrics.json").read_text())
                rec["greedyTest"] = (avg.get("testAccuracy") or {}).get(HELD_OUT)
                same = report["runs"].get(cfg, {}).get("0")
                rec["sameAsAccuracyRun"] = (same["greedy"]["test"] == rec["greedyTest"]) if same else None
            report["timing"][cfg] = rec
            log(f"timing {cfg}: {total:.0f} s (demo data {t_demo:.0f}, related data {t_rel:.0f}, run {t_run:.0f}), rc {rc}")
            save()
        return 0

    data = work / "data"
    if not (data / "demo-data.json").exists():
        log(f"building the demo data in {data}")
        build_demo_data(data, env)
    if "related" in configs and not (data / "related-data.json").exists():
        log(f"rendering {', '.join(RELATED)} into {data}")
        build_related_subprocess(data, env)
    if "checks" not in report or not report["checks"].get("pixel", {}).get("auxiliaries", {}).keys() >= set(RELATED):
        if (data / "related-data.json").exists():
            report["checks"] = checks(data)
            report["checks"]["relatedData"] = json.loads((data / "related-data.json").read_text())
            log(f"pixel-hash disjoint from the target: {report['checks']['pixel']['disjoint']}; related fonts "
                f"disjoint from the foundation's: {report['checks']['fonts']['disjoint']}")
            if not (report["checks"]["pixel"]["disjoint"] and report["checks"]["fonts"]["disjoint"]):
                save()
                raise SystemExit("auxiliaries overlap the target or the foundation's fonts: see the report")
    for seed in seeds:  # seed by seed, so that a partial set still compares the configurations
        for cfg in configs:
            storage = work / "runs" / f"{cfg}-s{seed}"
            logdir = work / "logs" / f"{cfg}-s{seed}"
            spec = write_spec(work, cfg, seed, data, storage)
            prefix = run_prefix(storage)
            if prefix is None:
                m0 = machine()
                log(f"run {cfg} seed {seed} (load {m0['load']}, niceness {os.nice(0)})")
                rc, secs, _ = ratatouille_run(spec, logdir, env)
                prefix = run_prefix(storage)
                if rc != 0 or prefix is None:
                    log(f"run {cfg} seed {seed} failed (rc {rc}); see {logdir / 'run.log'}")
                    continue
                timing = {"seconds": round(secs, 1), "machineBefore": m0, "machineAfter": machine(),
                          "niceness": os.nice(0), "note": "not a rule (c) measurement"}
            elif str(seed) in report["runs"].get(cfg, {}):
                log(f"run {cfg} seed {seed}: finished, kept")
                continue
            else:
                timing = None
            rec = parse_run(prefix, storage, data, seed, logdir / "run.log")
            rec.update({"spec": str(spec), "commit": commit, "wall": timing})
            report["runs"].setdefault(cfg, {})[str(seed)] = rec
            report["machine"] = machine()
            log(f"{cfg} seed {seed}: greedy {rec['greedy']['members']} members test {rec['greedy']['test']:.3f}, "
                f"best single {rec['bestSingle']['test']:.3f}, uniform {rec['uniform']['test']:.3f}")
            save()
    save()
    print(table(report["runs"]))
    print(json.dumps(report["decision"], indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
