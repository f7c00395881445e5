"""bench:model's trials summed over committed result files, per length, against issue #16's targets.

run.py --merge merges worker states of one machine's runs into one result. Trials of other machines and builds
(the 2-core VM's numpy model beside the GPU hosts' transformers) stay in their own result files; this sums those
files' per-configuration results where the trials are the same experiment: the same held-out text and seed (trial
i is the same context on every machine), budget, sinks, window, ef, steps and query stride. Each file's
configurations were compared with dense (`exact`) on that file's own trials, so the sums are of like counts:

- pass keys and dense's keys on the same trials, keys lost: summed;
- next-byte agreement: weighted by its teacher-forced positions (exact: the matches summed);
- attention output error per layer and exact share: weighted by trials (each trial adds the same number of decode
  steps per layer, steps + 4 free-running, the same in every file: checked).

A (configuration, trial) counted twice is refused. Which files count, and from which of them which configurations,
is TALLIES below (configurations of a build since changed are left out there, with the reason).

    python3 bench/model/tally.py            # writes bench/results/model-tally-<name>.json and .md for each tally
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
SAME = ("budget", "sinks", "window", "ef", "steps", "query_stride", "seed", "session_defaults")

# Issue #16's targets at 16K and 32K bytes.
MAX_EXACT_SHARE, MIN_AGREEMENT, MAX_LAYER_ERR, MIN_TRIALS, MAX_KEY_GAP = 0.03, 0.99, 0.05, 100, 0.02

# name: (length, [(result file, configurations to take or None for all but exact)]). Left out: model-vm-16k.json
# (no trial ids; its trials 0-16 are trials 0-16 of model-h200.json's, and its ivf is the build before d134c37);
# model-vm-16k-seed1.json (no trial ids); topk-blocks and nosa of model-vm-32k.json and of the H200's trials 0-31
# at 16K (in model-gpu-16k-merged.json): block summaries before a6aad4b (sub-centroids), counted from the files of
# the build after it instead; topk-blocks and nosa of model-vm-16k-blocks-new.json and model-vm-32k-blocks-new.json:
# the budget spent before d5dc1b6/4c461b3 (rounded up, sinks and window widened, no recent rows), counted from
# model-vm-blocks-recent.json instead (its `split` configurations: a per-layer budget of mean 0.024).
TALLIES: Dict[str, Tuple[int, List[Tuple[str, Optional[List[str]]]]]] = {
    "8k": (8192, [
        ("model-h200-8k-a.json", None),
        ("model-vm-8k-66.json", None),
    ]),
    "16k": (16384, [
        ("model-gpu-16k-merged.json", ["wave", "hnsw", "ivf", "retrieval-attention"]),
        ("model-vm-ivf.json", ["ivf"]),
        ("model-vm-blocks-recent.json", None),
    ]),
    "32k": (32768, [
        ("model-h200-32k-merged.json", None),
        ("model-vm-32k.json", ["wave", "hnsw", "retrieval-attention"]),
        ("model-vm-32k-c.json", None),
        ("model-vm-ivf.json", ["ivf"]),
        ("model-vm-blocks-recent.json", None),
    ]),
}


def machine_words(res: dict) -> str:
    ms = res.get("machines") or [res["machine"]]
    gpu = ", the model on a GPU" if "on cuda" in res["params"].get("model", "") else ""
    return "; ".join(dict.fromkeys(f"{m['cpu']}, {m['cores']} cores{gpu}" for m in ms))


def tally(length: int, sources: List[Tuple[str, Optional[List[str]]]]) -> dict:
    rows: Dict[str, dict] = {}
    params0: Optional[dict] = None
    files = []
    for name, labels in sources:
        res = json.loads((RESULTS / name).read_text())
        p = {k: res["params"].get(k) for k in SAME}
        if params0 is None:
            params0 = p
        elif p != params0:
            raise SystemExit(f"{name}: parameters {p} differ from {params0}: not the same experiment")
        r = next((r for r in res["lengths"] if r["length"] == length), None)
        if r is None:
            raise SystemExit(f"{name} has no {length}-byte trials")
        configs = {c["label"]: c for c in r["configs"]}
        dense = configs["exact"]
        take = labels or [c for c in configs if c != "exact"]
        files.append(dict(file=name, machine=machine_words(res), model=res["params"].get("model", ""),
                          date=res.get("date", ""), configurations=take))
        for label in take:
            c = configs[label]
            ids = c.get("trial_ids") or r["trial_ids"]
            pk = c["pass_key"]
            # A configuration on all of the file's trials was compared with dense on all of them.
            dense_hits = pk["dense_hits"] if "dense_hits" in pk else dense["pass_key"]["hits"]
            if "dense_hits" not in pk and ids != r["trial_ids"]:
                raise SystemExit(f"{name}: {label} ran on part of the trials and the file has no dense hits for them")
            row = rows.setdefault(label, dict(label=label, trials=0, hits=0, dense_hits=0, lost_vs_dense=0,
                                              agreement_steps=0, matches=0.0, err=None, exact_share=0.0,
                                              trial_ids=[], files=[]))
            again = set(row["trial_ids"]) & set(ids)
            if again:
                raise SystemExit(f"{label}: trials {sorted(again)[:5]} at {length} counted twice ({name})")
            n = len(ids)
            if n != pk["trials"]:
                raise SystemExit(f"{name}: {label} has {pk['trials']} pass-key trials but {n} trial ids")
            layer_err = [x["err"] for x in c["layers"]]
            row["err"] = [n * e for e in layer_err] if row["err"] is None else [a + n * e for a, e in zip(row["err"], layer_err)]
            row["trials"] += n
            row["hits"] += pk["hits"]
            row["dense_hits"] += dense_hits
            row["lost_vs_dense"] += pk["lost_vs_dense"]
            row["agreement_steps"] += c["agreement_steps"]
            row["matches"] += c["agreement"] * c["agreement_steps"]
            row["exact_share"] += n * c["exact_share"]
            row["trial_ids"] += [int(i) for i in ids]
            row["files"].append(f"{name} ({n})")
    out = []
    for row in rows.values():
        n = row["trials"]
        layers = [e / n for e in row["err"]]
        agreement = row["matches"] / row["agreement_steps"]
        gap = (row["dense_hits"] - row["hits"]) / n
        exact_share = row["exact_share"] / n
        out.append(dict(label=row["label"], trials=n, pass_key=dict(hits=row["hits"], dense_hits=row["dense_hits"],
                                                                       lost_vs_dense=row["lost_vs_dense"]),
                        key_gap_points=round(100 * gap, 2), agreement=agreement, agreement_steps=row["agreement_steps"],
                        layers_err=layers, worst_layer_err=max(layers), exact_share=exact_share,
                        trial_ids=sorted(row["trial_ids"]), files=row["files"],
                        meets=dict(exact_share=exact_share <= MAX_EXACT_SHARE, agreement=agreement >= MIN_AGREEMENT,
                                   layer_err=max(layers) <= MAX_LAYER_ERR, trials=n >= MIN_TRIALS,
                                   pass_key=abs(gap) <= MAX_KEY_GAP)))
    return dict(bench="model-tally", length=length, params=params0, files=files, configs=out,
                targets=dict(max_exact_share=MAX_EXACT_SHARE, min_agreement=MIN_AGREEMENT,
                             max_layer_err=MAX_LAYER_ERR, min_trials=MIN_TRIALS, max_key_gap=MAX_KEY_GAP))


def ranges(ids: List[int]) -> str:
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def markdown(t: dict) -> str:
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    L = len(t["configs"][0]["layers_err"])
    out = [f"# bench:model -- trials at {t['length']} bytes summed over result files (issue #16's targets)", "",
           "Written by `bench/model/tally.py` from the committed result files below (each its configurations' "
           "comparison with dense on its own trials): pass keys summed, agreement weighted by teacher-forced "
           "positions, errors and exact share by trials. Sessions: budget "
           f"{t['params']['budget']}, sinks {t['params']['sinks']}, window {t['params']['window']}, estimation on "
           "(the server's default); targets: exact share <= 3%, agreement >= 0.99, every layer's mean error <= 0.05, "
           "pass keys within 2 points of dense over >= 100 trials.", "", "| file | configurations | machine | model |",
           "| --- | --- | --- | --- |"]
    out += [f"| `{f['file']}` | {', '.join(f['configurations'])} | {f['machine']} | {f['model']} |" for f in t["files"]]
    out += ["", "| config | trials | exact share | agreement | worst layer err | pass keys | dense | gap (points) | "
                "lost vs dense | agreement >= 0.99 | layers <= 0.05 | keys within 2 points | >= 100 trials |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for c in t["configs"]:
        pk, m = c["pass_key"], c["meets"]
        out.append(f"| {c['label']} | {c['trials']} | {100 * c['exact_share']:.1f}% | {c['agreement']:.4f} | "
                   f"{c['worst_layer_err']:.3f} | {pk['hits']}/{c['trials']} | {pk['dense_hits']}/{c['trials']} | "
                   f"{c['key_gap_points']:+.1f} | {pk['lost_vs_dense']} | {yes(m['agreement'])} | "
                   f"{yes(m['layer_err'])} | {yes(m['pass_key'])} | {yes(m['trials'])} |")
    out += ["", "Gap: dense's keys less the method's, in points of the trials (positive: the method finds fewer).", "",
            "Mean attention output error per layer:", "", "| config | " + " | ".join(f"L{i}" for i in range(L)) + " |",
            "| --- |" + " ---: |" * L]
    out += [f"| {c['label']} | " + " | ".join(f"{e:.3f}" for e in c["layers_err"]) + " |" for c in t["configs"]]
    out += ["", "Trials per configuration:", ""]
    out += [f"- {c['label']}: {ranges(c['trial_ids'])} (from {', '.join(c['files'])})" for c in t["configs"]]
    return "\n".join(out) + "\n"


def main() -> None:
    names = sys.argv[1:] or list(TALLIES)
    for name in names:
        length, sources = TALLIES[name]
        t = tally(length, sources)
        (RESULTS / f"model-tally-{name}.json").write_text(json.dumps(t, indent=1) + "\n")
        (RESULTS / f"model-tally-{name}.md").write_text(markdown(t))
        print(markdown(t))


if __name__ == "__main__":
    main()
