"""Provenance of an averaged model: ``lineage.json`` and the Markdown model card.

Pure functions (no I/O, no clock, no randomness): the same inputs give byte-identical output,
so a re-run of the averaging Job rewrites the same files. Standard library only.

``write_lineage(members, result)`` takes

* ``members``: one dict per target member, as found in its ``metrics.json`` plus where it came
  from: ``member`` (required), ``uri`` (required: the member's weights or output prefix),
  ``sha256``, ``source`` (initialization source: ``foundation`` or an auxiliary name),
  ``init`` (optional ``{source, featurizer, head}``), ``hyperparameters``, ``valAccuracy``,
  ``testAccuracy`` (``{domain: acc}``), ``selected`` (bool; defaults from ``result``).
* ``result``: ``sha256`` (of the averaged ``model.safetensors``), ``selection`` (``uniform`` or
  ``greedy``), and optionally ``uri``, ``selected`` (member names), ``valAccuracy``,
  ``testAccuracy``, ``run`` (``{namespace, name, uid}``), ``foundation`` (``{model, weights,
  inputSize}``), ``data`` (``{dataset, testDomains}``), ``uniform``, ``interpolation``,
  ``greedyTrace``, ``sources``, ``ensemble``, ``convergence``, ``diagnosticWarnings`` (the
  averaging diagnostics, ``diagnostics.py``), ``trainerVersion``, ``createdAt`` (passed in,
  never read from a clock).

Accuracies are fractions in [0, 1] (as in ``metrics.json``); the card shows them as percents.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

from ratatouille_contract.jobdesc import best_member, member_key

LINEAGE_VERSION = 1
LINEAGE_KIND = "ratatouille.dev/lineage"

__all__ = ["write_lineage", "model_card", "lineage_json", "LINEAGE_VERSION"]


def _acc(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _test_map(v: Any) -> dict[str, float | None]:
    if not isinstance(v, Mapping):
        return {}
    return {str(k): _acc(v[k]) for k in sorted(v, key=str)}


def _mean_test(test: Mapping[str, float | None]) -> float | None:
    vals = [v for v in test.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def _plain(v: Any) -> Any:
    """A JSON-safe deep copy with sorted mapping keys."""
    if isinstance(v, Mapping):
        return {str(k): _plain(v[k]) for k in sorted(v, key=str)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _best_single(members: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    top = best_member({m["member"]: m["valAccuracy"] for m in members})
    if top is None:
        return None
    best = next(m for m in members if m["member"] == top)
    return {"member": best["member"], "source": best["source"],
            "valAccuracy": best["valAccuracy"], "testAccuracy": dict(best["testAccuracy"])}


def _lineage_member(i: int, m: Any, selection: str, selected_set: set[str] | None) -> dict[str, Any]:
    """One member's lineage entry; whether it was averaged comes from the member itself, else the
    result's ``selected`` list, else the selection (uniform averages every member)."""
    if not isinstance(m, Mapping):
        raise ValueError(f"members[{i}] must be a mapping")
    for req in ("member", "uri"):
        if not m.get(req):
            raise ValueError(f"members[{i}].{req} is required")
    name = str(m["member"])
    init = dict(m.get("init") or {})
    source = m.get("source") or init.get("source") or "foundation"
    init.setdefault("source", source)
    if "selected" in m and m["selected"] is not None:
        selected = bool(m["selected"])
    elif selected_set is not None:
        selected = name in selected_set
    else:
        selected = selection == "uniform"
    return {
        "member": name,
        "uri": str(m["uri"]),
        "sha256": m.get("sha256"),
        "source": str(source),
        "init": _plain(init),
        "hyperparameters": _plain(m.get("hyperparameters") or {}),
        "valAccuracy": _acc(m.get("valAccuracy")),
        "testAccuracy": _test_map(m.get("testAccuracy")),
        "bestStep": m.get("bestStep"),
        "selected": selected,
    }


def write_lineage(members: list[dict], result: dict) -> dict:
    """The content of ``average/lineage.json`` (see the module docstring)."""
    if not isinstance(result, Mapping):
        raise ValueError("result must be a mapping")
    selection = str(result.get("selection", "uniform"))
    if selection not in ("uniform", "greedy"):
        raise ValueError(f"result.selection must be 'uniform' or 'greedy', got {selection!r}")
    selected_names = result.get("selected")
    selected_set = None if selected_names is None else {str(s) for s in selected_names}

    out_members: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, m in enumerate(members):
        entry = _lineage_member(i, m, selection, selected_set)
        if entry["member"] in seen:
            raise ValueError(f"members[{i}].member {entry['member']!r} is listed twice")
        seen.add(entry["member"])
        out_members.append(entry)
    out_members.sort(key=lambda m: member_key(m["member"]))
    if selected_set is not None:
        unknown = sorted(selected_set - seen, key=member_key)
        if unknown:
            raise ValueError(f"result.selected names unknown member {unknown[0]!r}")

    chosen = [m["member"] for m in out_members if m["selected"]]
    if selected_names is not None:
        # keep the order the selection happened in (greedy: ranking order)
        chosen = [str(s) for s in selected_names]

    best_single = _plain(result["bestSingle"]) if result.get("bestSingle") else \
        _best_single(out_members)

    lineage: dict[str, Any] = {
        "kind": LINEAGE_KIND,
        "version": LINEAGE_VERSION,
        "run": _plain(result.get("run") or {}),
        "foundation": _plain(result.get("foundation") or {}),
        "data": _plain(result.get("data") or {}),
        "selection": selection,
        "result": {
            "uri": result.get("uri"),
            "sha256": result.get("sha256"),
            "membersAveraged": len(chosen),
            "selected": chosen,
            "valAccuracy": _acc(result.get("valAccuracy")),
            "testAccuracy": _test_map(result.get("testAccuracy")),
        },
        "bestSingle": best_single,
        "members": out_members,
    }
    for extra in ("uniform", "interpolation", "greedyTrace", "sources", "ensemble", "convergence",
                  "diagnosticWarnings", "trainerVersion", "createdAt"):
        if result.get(extra) is not None:
            lineage[extra] = _plain(result[extra])
    return lineage


def lineage_json(lineage: Mapping[str, Any]) -> str:
    """Canonical text of ``lineage.json`` (sorted keys, two-space indent, final newline)."""
    return json.dumps(_plain(lineage), indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------

def _pct(v: Any) -> str:
    v = _acc(v)
    return "n/a" if v is None else f"{100.0 * v:.2f}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#])")


def _cell(v: Any) -> str:
    """A value as Markdown text (table cell or prose): every character that could start markup
    (emphasis, links, images, HTML, code, table pipes, headings) is escaped and line breaks
    become spaces, so run, dataset and member names cannot inject Markdown into the card."""
    s = "n/a" if v is None or v == "" else str(v)
    return _MD_SPECIAL.sub(r"\\\1", _CONTROL.sub(" ", s)).replace("&", "&amp;")


def _code(v: Any) -> str:
    """A value as inline code: on one line, fenced with more backticks than it contains, pipes
    escaped (GitHub tables split cells on them even inside code)."""
    s = _CONTROL.sub(" ", "n/a" if v is None or v == "" else str(v)).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if longest or s.startswith(" ") or s.endswith(" ") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _short(sha: Any) -> str:
    return "n/a" if not sha else _code(str(sha)[:12])


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return "n/a"
    return f"{float(v):.{digits}f}"


def _pts(v: Any) -> str:
    """A difference of accuracies in percentage points, signed."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return "n/a"
    return f"{100.0 * float(v):+.2f}"


def _diagnostics_section(lineage: Mapping[str, Any]) -> list[str]:
    """The averaging diagnostics (diagnostics.py), in points of pooled validation accuracy."""
    uni = lineage.get("uniform")
    if not isinstance(uni, Mapping):
        return []
    L = ["## Averaging diagnostics", "",
         "On the pooled training-domain validation split; differences in percentage points.", ""]
    L.append(f"- Uniform average {_pct(uni.get('valAccuracy'))}: gain over the members' mean "
             f"{_pts(uni.get('gain'))}, gap to the best member {_pts(uni.get('gapToBest'))}; "
             f"collapse: {_cell(uni.get('collapseGrade', 'yes' if uni.get('collapse') else 'no'))} "
             f"(a drop below the members' mean counts beyond {_pct(uni.get('collapseMargin'))} on "
             f"{_cell(uni.get('valImages'))} images).")
    ens = lineage.get("ensemble")
    if isinstance(ens, Mapping):
        L.append(f"- Members' prediction disagreement {_num(ens.get('disagreement'), 4)} (share of "
                 f"member pairs predicting different classes); functional ensemble "
                 f"{_pct(ens.get('valAccuracy'))}.")
    conv = lineage.get("convergence")
    if isinstance(conv, Mapping) and conv.get("members"):
        L.append(f"- {_cell(conv.get('bestAtLast'))} of {_cell(conv.get('members'))} members are best at "
                 f"their last evaluation{' (train longer before averaging)' if conv.get('warn') else ''}.")
    it = lineage.get("interpolation")
    if isinstance(it, Mapping):
        for p in it.get("pairs") or [it]:
            if not isinstance(p, Mapping):
                continue
            what = ("same hyperparameters" if p.get("kind") == "twins"
                    else "the farthest pair found")
            L.append(f"- Interpolation {_code(p.get('a'))} ({_cell(p.get('sourceA'))}) to "
                     f"{_code(p.get('b'))} ({_cell(p.get('sourceB'))}), {what}: barrier "
                     f"{_pts(p.get('barrier'))} (featurizer L2 distance {_num(p.get('featurizerDistance'), 3)}).")
    src = lineage.get("sources")
    if isinstance(src, Mapping) and src:
        L.append("")
        L.append("| init source | members | mean validation | source featurizer rel. L2 from foundation"
                 " | members rel. L2 from foundation | uniform without it | change |")
        L.append("|---|---|---|---|---|---|---|")
        for name in sorted(src):
            r = src[name] if isinstance(src[name], Mapping) else {}
            L.append("| " + " | ".join([_cell(name), _cell(r.get("members")), _pct(r.get("meanVal")),
                                        _num(r.get("featurizerRelL2")), _num(r.get("membersRelL2")),
                                        _pct(r.get("leaveOutVal")), _pts(r.get("leaveOutGain"))]) + " |")
    warns = lineage.get("diagnosticWarnings")
    if isinstance(warns, (list, tuple)) and warns:
        L.append("")
        for w in warns:
            if isinstance(w, Mapping):
                L.append(f"**Warning** ({_cell(w.get('code'))}): {_cell(w.get('message'))}")
                L.append("")
    if L[-1] != "":
        L.append("")
    return L


class _Card(NamedTuple):
    """What every section of the model card reads from the lineage."""
    lineage: Mapping[str, Any]
    run: Mapping[str, Any]
    foundation: Mapping[str, Any]
    res: Mapping[str, Any]
    members: list
    best: Mapping[str, Any] | None
    selection: str
    n_avg: int
    model_name: str
    dataset: str
    test_domains: list

    @staticmethod
    def of(lineage: Mapping[str, Any]) -> "_Card":
        foundation = lineage.get("foundation") or {}
        data = lineage.get("data") or {}
        res = lineage.get("result") or {}
        return _Card(lineage, lineage.get("run") or {}, foundation, res, lineage.get("members") or [],
                     lineage.get("bestSingle") or None, lineage.get("selection", "uniform"),
                     res.get("membersAveraged", 0), foundation.get("model") or "unknown foundation",
                     data.get("dataset") or "the target dataset", list(data.get("testDomains") or []))


def _what_section(c: _Card) -> list[str]:
    sources = sorted({m.get("source", "foundation") for m in c.members if m.get("selected")},
                     key=lambda s: (s != "foundation", s))
    title = _cell(c.run.get("name") or "averaged model")
    L = [f"# {title}: Model Ratatouille average of {c.n_avg} fine-tuned "
         f"{'member' if c.n_avg == 1 else 'members'}", "", "## What this model is", ""]
    L.append(f"A weight average (\"Model Ratatouille\") of {c.n_avg} of {len(c.members)} fine-tunings of "
             f"the foundation model {_code(c.model_name)} on {_code(c.dataset)}. Every member started from the "
             "same linear-probe head; their featurizers were initialized from "
             f"{len(sources)} source{'' if len(sources) == 1 else 's'} "
             f"({', '.join(_code(s) for s in sources) or 'n/a'}), and their weights (featurizer "
             "and head, float buffers included) were averaged into one network of the same "
             "size and inference cost as a single member.")
    L += ["", "| | |", "|---|---|", f"| Foundation | {_code(c.model_name)} |",
          f"| Foundation weights | {_cell(c.foundation.get('weights') or 'random initialization')} |"]
    if c.foundation.get("inputSize"):
        L.append(f"| Input size | {_cell(c.foundation.get('inputSize'))} |")
    L.append(f"| Dataset | {_cell(c.dataset)} |")
    L.append(f"| Test domains (never trained on) | {_cell(', '.join(map(str, c.test_domains)) or 'none')} |")
    L.append(f"| Selection | {_cell(c.selection)} |")
    L.append(f"| Members averaged | {c.n_avg} of {len(c.members)} |")
    L.append(f"| Weights sha256 | {_cell(c.res.get('sha256'))} |")
    if c.run:
        L.append(f"| Run | {_cell(c.run.get('namespace'))}/{_cell(c.run.get('name'))} "
                 f"(uid {_cell(c.run.get('uid'))}) |")
    if c.lineage.get("trainerVersion"):
        L.append(f"| Trainer version | {_cell(c.lineage['trainerVersion'])} |")
    L.append("")
    return L


def _selection_section(c: _Card) -> list[str]:
    L = ["## Selection", ""]
    if c.selection == "greedy":
        L.append("Greedy: members were ranked by their own training-domain validation accuracy; "
                 "the best was kept, and each next member was kept only if the average's "
                 "accuracy on the pooled training-domain validation splits stayed at least as "
                 "high as the best so far. By construction the result's validation accuracy is "
                 "never below the best single member's.")
    else:
        L.append("Uniform: the arithmetic mean of every member's weights.")
    if c.res.get("selected"):
        L += ["", "Averaged members: " + ", ".join(_code(s) for s in c.res["selected"]) + "."]
    L.append("")
    return L


def _accuracy_section(c: _Card) -> list[str]:
    L = ["## Accuracy (%)", "",
         "Validation is the pooled training-domain validation split (used for selection); "
         "test is each held-out test domain.", ""]
    domains = list(c.test_domains) or sorted(set(c.res.get("testAccuracy") or {}) |
                                             set((c.best or {}).get("testAccuracy") or {}))
    head = ["model", "validation"] + [f"test: {_cell(d)}" for d in domains]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))

    def row(label: str, val: Any, test: Mapping[str, Any]) -> str:
        test = test or {}
        return "| " + " | ".join([label, _pct(val)] + [_pct(test.get(d)) for d in domains]) + " |"

    L.append(row(f"this model ({c.selection}, {c.n_avg} members)", c.res.get("valAccuracy"),
                 c.res.get("testAccuracy") or {}))
    uni = c.lineage.get("uniform")
    if c.selection != "uniform" and isinstance(uni, Mapping):
        L.append(row("uniform average (all members)", uni.get("valAccuracy"), uni.get("testAccuracy") or {}))
    if c.best:
        L.append(row(f"best single member ({_code(c.best.get('member'))})",
                     c.best.get("valAccuracy"), c.best.get("testAccuracy") or {}))
    L.append("")
    return L


def _use_and_load_sections(c: _Card) -> list[str]:
    L = ["## Intended use", "",
         f"Image classification on the classes of {_code(c.dataset)}, in particular under "
         "distribution shift to domains like the held-out test domains. The accuracies "
         "above are measured on those domains only; check it on your own data before "
         "relying on it. It inherits the biases and licenses of the foundation model and "
         "of every dataset its members (and their auxiliary initializations) were trained "
         "on, listed below.", ""]
    L += ["## How to load", "",
          "The weights are a single safetensors file (no pickle): the full network state "
          "dict, featurizer under `featurizer.*`, classification head under `head.*`, "
          "buffers included.", "",
          "```python", "from safetensors.torch import load_file", "",
          'state = load_file("model.safetensors")  # dict of tensor name -> tensor',
          f"# build the same network ({_CONTROL.sub(' ', str(c.model_name))} featurizer + linear head), then:",
          "# model.load_state_dict(state)", "```", ""]
    if c.res.get("sha256"):
        L += [f"Check the file first: `sha256sum model.safetensors` must print {_code(c.res['sha256'])}.", ""]
    return L


def _lineage_section(c: _Card) -> list[str]:
    L = ["## Lineage", "",
         "Every fine-tuned member, whether it was averaged, and where it came from "
         "(full details in `lineage.json`).", "",
         "| member | averaged | init source | lr | weight decay | dropout | validation | "
         "mean test | sha256 | uri |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for m in c.members:
        hp = m.get("hyperparameters") or {}
        L.append("| " + " | ".join([
            _code(m.get("member")), "yes" if m.get("selected") else "no", _cell(m.get("source")),
            _cell(hp.get("lr")), _cell(hp.get("weightDecay")), _cell(hp.get("dropout")),
            _pct(m.get("valAccuracy")), _pct(_mean_test(_test_map(m.get("testAccuracy")))),
            _short(m.get("sha256")), _cell(m.get("uri")),
        ]) + " |")
    L.append("")
    return L


def model_card(lineage: dict) -> str:
    """A Markdown model card for the averaged model described by ``lineage``."""
    c = _Card.of(lineage)
    return "\n".join(_what_section(c) + _selection_section(c) + _accuracy_section(c)
                     + _diagnostics_section(lineage) + _use_and_load_sections(c) + _lineage_section(c))
