"""bench:model's result files: the markdown of a run's results (bench/model/run.py)."""

from __future__ import annotations

from typing import Dict

import numpy as np

import kvdecode


def fmt(x: float, d: int = 3) -> str:
    return f"{x:.{d}f}"


def per_trial(r: Dict[str, object]) -> str:
    ts, tm, n = r.get("trial_s") or [], r["timing"], max(1, r["trials"])
    decode = sum(tm["decode_s"].values()) + tm["local_dense_s"]
    loads = r.get("load_per_trial") or []
    whole = f"{np.mean(ts):.1f} s (min {min(ts):.1f}, max {max(ts):.1f}" if ts else "n/a ("
    whole += f"; load {min(loads):.1f}-{max(loads):.1f})" if loads else ")"
    rate = (f"; {r['trials']} trials in {r['span_s']:.0f} s from the first's start to the last's end "
            f"({60 * r['trials'] / max(r['span_s'], 1e-9):.1f} a minute)") if r.get("span_s") else ""
    return (f"{whole}: prefill {tm['prefill_s'] / n:.1f} s, push + seal {tm['push_s'] / n:.1f} s, decode of every "
            f"configuration and the local reference {decode / n:.1f} s{rate}")


def markdown(res: Dict[str, object]) -> str:
    m, p = res["machine"], res["params"]
    runs = f"; {res['runs']} runs merged (wall time summed)" if res.get("runs", 1) > 1 else ""
    out = ["# bench:model -- kvrecall-code-13M decoded through kvrecall", "",
           "Written by `bench/model/run.py` (`npm run bench:model`). Every layer's attention at every decode position "
           "is a kvrecall session's answer (stream transport, one frame per layer); the rest of the model runs in "
           "numpy or torch (model below). Errors are against float64 dense attention over what the session holds (the document's f16 K/V "
           "and the appended tokens' f16 k/v); the oracle is the exact top-k (by mean probability over the GQA "
           "group) at the session's own exact count per kv head. Agreement and KL are against the same decode "
           "through `exact` (teacher-forced positions only); the pass key is the free-running greedy answer.", "",
           *[f"- machine{' (as `' + m['source'] + '` records it)' if m.get('source') else ''}: {m['cpu']}, "
             f"{m['cores']} cores, {m['arch']}; server backend {m['backend']} "
             f"({m['threads']} native threads){', GPU ' + m['gpu'] if m.get('gpu') else ''}; Python {m['python']}, "
             f"numpy {m['numpy']}" for m in res.get("machines") or [m]],
           ("- sessions: the server's defaults (budget, sinks, window per method: engine/sessions.ts)" if p.get("session_defaults") else
            f"- sessions: budget {p['budget']} (of the context), sinks {p['sinks']}, window {p['window']}") +
           f"{', ef ' + str(p['ef']) if p['ef'] else ''}; document prefill queries kept at stride {p['query_stride']}; "
           f"document sealed with {', '.join(p['document_methods'])}"
           f"{', wave clusters of ' + str(p['cluster_size']) + ' tokens' if p.get('cluster_size') else ''}",
           f"- held-out text: {p['heldout']} (seed {p['seed']}); model {p['model']}; float64 reference "
           f"{p.get('reference') or 'numpy'}",
           f"- {p.get('workers', 1)} worker(s) running trials in parallel"
           f"{', each with its own server (latencies are under that load)' if p.get('workers', 1) > 1 else ''}"
           f"{runs}; wall time "
           f"{res['wall_s']:.0f} s; load average at the last save {res['load_average'][0]:.1f} (other jobs may share the "
           f"cores), "
           f"{res['date']}", ""]
    out += [f"- error: {e.splitlines()[0]}" for e in res.get("errors", [])] + ([""] if res.get("errors") else [])
    for r in res["lengths"]:
        L = len(r["configs"][0]["layers"])
        ld = r["local_dense"]
        tm = r["timing"]
        out += [f"## {r['length']} bytes ({r['document_tokens']} document tokens, {r['trials']} trials, "
                f"{r['steps']} teacher-forced positions + {kvdecode.PASS_KEY_DIGITS - 1} free-running)", "",
                f"`exact` through kvrecall vs the local dense decode (the same model, float64 attention over the same "
                f"f16 K/V): next-byte "
                f"agreement {fmt(ld['agreement'])}, same pass-key answers {ld['same_answers']}/{r['trials']}, "
                f"max logit difference {ld['max_logit_diff']:.2e}. Prefill {tm['prefill_s']:.1f} s, push + seal "
                f"{tm['push_s']:.1f} s (all trials); per trial {per_trial(r)}.", "",
                "| config | exact share | est. share | scanned share | mean err | oracle err | recall | "
                "top-1 = dense | KL (nats) | pass key | lost vs dense | server ms p50 / p99 | rtt ms p50 | ms / token |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c in r["configs"]:
            pk, lt = c["pass_key"], c["latency"]
            out.append(f"| {c['label']} | {100 * c['exact_share']:.1f}% | {100 * c['estimated_share']:.1f}% | "
                       f"{100 * c['scanned_share']:.1f}% | {fmt(c['err'])} | {fmt(c['oracle_err'])} | "
                       f"{fmt(c['recall'])} | {fmt(c['agreement'])} | {c['kl']:.4f} | {pk['hits']}/{pk['trials']} | "
                       f"{pk['lost_vs_dense']} | {lt['server_ms_p50']:.2f} / {lt['server_ms_p99']:.2f} | "
                       f"{lt['rtt_ms_p50']:.2f} | {lt['token_ms_p50']:.1f} |")
        for c in r["configs"]:
            if c.get("trial_ids"):  # merged runs: a configuration some runs did not have
                pk = c["pass_key"]
                out.append(f"\n`{c['label']}` ran on {pk['trials']} of the {r['trials']} trials; its agreement, KL and "
                           f"keys lost are against dense on those ({pk['dense_hits']}/{pk['trials']} keys).")
        for c in r["configs"]:
            if c.get("plan"):
                out.append(f"\nPolicy `{c['label']}`: " + ", ".join(
                    f"L{i} {m}{'' if e is None else (' +estimate' if e else ' -estimate')}"
                    f"{'' if b is None else f' (budget {b})'}" for i, (m, e, b) in enumerate(c["plan"]))
                    + (f"; ef {c['ef']}" if c.get("ef") else ""))
        out += ["", "Attention output error per layer (mean; the exact top-k oracle at the same count in brackets):", "",
                "| config | " + " | ".join(f"L{i}" for i in range(L)) + " |",
                "| --- |" + " ---: |" * L]
        for c in r["configs"]:
            out.append(f"| {c['label']} | " + " | ".join(f"{fmt(x['err'])} ({fmt(x['oracle_err'])})" for x in c["layers"])
                       + " |")
        out += ["", "Attention recall per layer (mass of the exact part; the oracle's in brackets) and exact share:", "",
                "| config | " + " | ".join(f"L{i}" for i in range(L)) + " |",
                "| --- |" + " ---: |" * L]
        for c in r["configs"]:
            out.append(f"| {c['label']} | " + " | ".join(
                f"{fmt(x['recall'])} ({fmt(x['oracle_recall'])}) {100 * x['exact_share']:.1f}%" for x in c["layers"])
                       + " |")
        out += ["", "Decode wall time per configuration (s, all trials, incl. the local float64 reference): " +
                ", ".join(f"{k} {v:.1f}" for k, v in tm["decode_s"].items()), ""]
    return "\n".join(out) + "\n"
