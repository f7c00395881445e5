"""Token agreement of sparse kvrecall decoding with dense decoding, on a real
Llama-architecture model (Karpathy's stories260K) run through the
transformers adapter (issue #7).

    python3 -m kvrecall.demo_sparse --serve --out results.json --markdown results.md
    python3 -m kvrecall.demo_sparse --url http://127.0.0.1:8700 --new 64 --budgets 8,16,32,64

(from clients/python, or with it on PYTHONPATH). Needs torch, transformers,
numpy, msgpack; `--serve` starts `node dist/cli/cli.js serve` of this
checkout on a free port with a temporary data folder.

For each prompt (TinyStories-like text, 200-400 tokens with BOS) it decodes
`--new` tokens greedily:
- dense: the model's own attention with its K/V rounded to f16 as kvrecall
  stores them (the adapter's local path, nothing sent); the reference;
- through kvrecall with the prompt pushed as a document
  (`KvrecallAttention(prompt_as_document=True)`, the prompt's query rows
  sent for the attention-aware builds, queryStride 1) and the session
  attached to it: method `exact` (must agree 100%), then every sparse method
  of the server's registry at each budget (default 8, 16, 32, 64, 128), plus
  a "full" budget covering the whole prompt (must agree 100% too).

Prefill stays local and dense; every decode step of every layer goes to
kvrecall, which attends sinks + window + the session's own tokens
(generated so far) + up to `budget` retrieved prompt tokens per kv head.

Reported per (method, budget): kept fraction (tokens attended / context
tokens, from the server's attend stats, over all steps and layers),
agreement (fraction of generated positions equal to dense), the first
position that differs (None: none), and teacher-forced agreement (fed the
dense tokens, the fraction of steps whose greedy choice is the dense one;
it does not compound after a first divergence).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from .client import Client, KvrecallError
from .stories260k import Tokenizer, build_model, find_model_dir

SPARSE_METHODS = ["retrieval-attention", "nosa", "topk-blocks", "squeezed", "squeezed-2l", "infiniretri", "ivf", "hnsw"]
FULL = "full"

PROMPTS = [
    "Once upon a time, there was a little girl named Mia. Mia had a red ball that she loved very much. Every day she "
    "took the ball to the park and played with her friend Tom. One sunny day, Mia threw the ball very high. The ball "
    "went over the fence and into the garden of an old man. Mia was sad. She did not want to lose her ball. Tom said, "
    '"Let\'s ask the old man to give it back." Mia was scared, but she was brave. They walked to the gate and knocked. '
    'The old man opened the door. He had a big smile. "Is this your ball?" he asked. Mia nodded. The old man gave her '
    'the ball and a cookie too. Mia said, "Thank you!" From that day on, Mia and Tom visited the old man every week. '
    "They told him about their games, and he told them stories about when he was a little boy. The old man was not "
    "lonely anymore, and Mia learned that being brave can make a new friend. One day, the old man showed them a box in "
    "his garden. Inside the box there was",
    "Tim was a small dog who lived in a blue house with his family. He liked to run, to jump and to dig in the mud. "
    "His mom did not like the mud, because it made the floor dirty. One morning, Tim saw a bird in the yard. The bird "
    "was yellow and it sang a happy song. Tim wanted to play with the bird, so he ran after it. The bird flew up into "
    "a tall tree. Tim could not climb the tree. He sat down and barked. The bird looked down at Tim and said, \"Why "
    'are you barking?" Tim said, "I want to be your friend." The bird thought for a moment. Then it flew down and '
    "sat on Tim's head. Tim was very happy. They played all day in the sun. When it was time to go home, the bird "
    'said, "I will come back tomorrow." Tim wagged his tail. The next day, the bird came back with a friend. It was a '
    "little cat named Kitty. Kitty was shy and she hid behind the tree. Tim walked to her slowly and said",
    "Lily and her brother Ben wanted to make a cake for their mom. It was her birthday, and they wanted to surprise "
    "her. They went to the kitchen and took out a big bowl. Ben found the flour and Lily found the eggs. They mixed "
    "everything together with a spoon. The batter was sticky and sweet. Lily put some on her nose and Ben laughed. "
    "Then they put the cake in the oven. They waited and waited. The kitchen smelled so good! When the cake was "
    'ready, it was warm and brown. Ben said, "We need to make it pretty." They put pink frosting on top and little '
    "stars made of sugar. Lily wrote a big word on the cake. It said MOM. When their mom came home, she saw the cake "
    'and gave them a big hug. "This is the best gift ever," she said. They all sat at the table and ate the cake '
    "together. After the party, Lily and Ben cleaned the kitchen. Their mom was proud of them. That night, Lily "
    "asked her mom",
    "There was a little boat named Sam. Sam lived by the sea with many other boats. The big boats went far away to "
    "catch fish, but Sam was too small. He stayed near the shore and watched the waves. One day, a storm came. The "
    "wind was strong and the rain was cold. A little girl was on the beach and she could not find her way home. Sam "
    "saw her and wanted to help. He went to the girl and said, \"Get in, I will take you home.\" The girl climbed into "
    "the boat. Sam sailed along the shore. The waves were big, but Sam was careful. Soon they saw a small house with "
    "a light in the window. The girl's dad was waiting at the door. He was so happy to see her. He thanked Sam and "
    "gave him a new coat of paint. Sam felt proud. The big boats heard the story and they were happy too. From then "
    "on, nobody said that Sam was too small. One morning, the girl came back to the beach with",
]


# --- running --------------------------------------------------------------


class _Switch:
    """One registered attention function whose target can change between runs."""

    def __init__(self):
        self.target = None

    def __call__(self, *args, **kwargs):
        return self.target(*args, **kwargs)


def _greedy(model, ids, new: int, force: Optional[List[int]] = None):
    """Greedy decoding with a DynamicCache: `new` tokens, or (teacher forcing) the
    greedy choice at each step while feeding `force`."""
    import torch

    chosen: List[int] = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        for i in range(new):
            tok = int(out.logits[0, -1].argmax())
            chosen.append(tok)
            if i == new - 1:
                break
            nxt = tok if force is None else force[i]
            out = model(input_ids=torch.tensor([[nxt]], device=ids.device), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return chosen


def _agreement(got: Sequence[int], want: Sequence[int]) -> Dict[str, Any]:
    same = [a == b for a, b in zip(got, want)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return {"agreement": sum(same) / len(want), "first_divergence": first}


def run_demo(
    client: Client,
    model_dir: str,
    prompts: Sequence[str] = PROMPTS,
    methods: Sequence[str] = SPARSE_METHODS,
    budgets: Sequence[int] = (8, 16, 32, 64, 128),
    new: int = 64,
    sinks: int = 4,
    window: int = 16,
    ef: int = 0,
    full: bool = True,
    teacher_forced: bool = True,
    exact: bool = True,
    device: Optional[str] = None,
    log=print,
    stop_at: Optional[float] = None,
) -> Dict[str, Any]:
    """Runs the comparison; returns the results (see `to_markdown`).

    stop_at: a time.time() after which no new (method, budget) is started;
    those left are listed under "not_run"."""
    import torch
    import transformers

    from .hf import KvrecallAttention, local_attention, register, use_attention

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    try:
        model = build_model(model_dir, device=device)
        tok = Tokenizer(model_dir)
        switch = _Switch()
        register("kvrecall_demo", switch)
        use_attention(model, "kvrecall_demo")
        registry = _server_methods(client)
        result: Dict[str, Any] = {
            "model": "stories260K (llama2.c tinyllamas; 5 layers, 8 q / 4 kv heads, head_dim 8), float32",
            "device": _device_name(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "server": {k: v for k, v in client.health().items() if k in ("version", "backend", "threads")},
            "new_tokens": new,
            "params": {"sinks": sinks, "window": window, "ef": ef, "queryStride": 1, "kv_dtype": "f16"},
            "dense": "the model's attention (SDPA) over its K/V rounded to f16, as kvrecall stores them",
            "prompts": [],
            "rows": [],
            "failures": [],
            "not_run": [],
        }
        dense_runs = []
        for p, text in enumerate(prompts):
            ids = tok.encode(text)
            x = torch.tensor([ids], device=device)
            switch.target = local_attention("f16")
            want = _greedy(model, x, new)
            switch.target = _plain_sdpa
            fp32 = _greedy(model, x, new)
            dense_runs.append((x, want))
            result["prompts"].append({
                "tokens": len(ids),
                "text_start": text[:60] + "...",
                "dense_continuation": tok.decode(want, prev=ids[-1]),
                "fp32_kv_agreement": _agreement(fp32, want),
            })
            log(f"prompt {p}: {len(ids)} tokens; dense continues {tok.decode(want[:24], prev=ids[-1])!r}...")

        configs = [("exact", None)] if exact else []
        for m in methods:
            if registry is not None and m not in registry:
                result["failures"].append({"method": m, "budget": None, "error": "not in the server's method registry"})
                continue
            configs += [(m, b) for b in budgets] + ([(m, FULL)] if full else [])
        for method, budget in configs:
            if stop_at is not None and time.time() > stop_at:
                result["not_run"].append({"method": method, "budget": budget})
                continue
            per_prompt = []
            for p, (x, want) in enumerate(dense_runs):
                n = x.shape[1]
                opts: Dict[str, Any] = {"sinks": sinks, "window": window}
                if budget == FULL:
                    opts.update(budget=n, ef=n)
                elif budget is not None:
                    opts.update(budget=int(budget), ef=ef)
                adapter = KvrecallAttention(client, method=method, kv_dtype="f16", prompt_as_document=True, query_stride=1,
                                            session_options=opts, document_prefix="demo-sparse")
                t0 = time.perf_counter()
                try:
                    switch.target = adapter
                    got = _greedy(model, x, new)
                    kept, attends = adapter.kept_fraction, adapter.stats["attends"]
                    adapter.reset()
                    forced = _greedy(model, x, new, force=want) if teacher_forced else None
                except (KvrecallError, OSError, RuntimeError) as e:
                    result["failures"].append({"method": method, "budget": budget, "prompt": p, "error": f"{type(e).__name__}: {e}"})
                    log(f"{method} budget {budget} prompt {p}: FAILED {type(e).__name__}: {e}")
                    per_prompt = None
                    break
                finally:
                    adapter.close()
                row = {"prompt": p, "kept": kept, "attends": attends, "seconds": round(time.perf_counter() - t0, 3), **_agreement(got, want)}
                if forced is not None:
                    row["forced_agreement"] = _agreement(forced, want)["agreement"]
                per_prompt.append(row)
            if per_prompt is None:
                continue
            row = _summarize(method, budget, per_prompt)
            result["rows"].append(row)
            log(_row_line(row))
        return result
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _plain_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _summarize(method: str, budget: Any, per_prompt: List[Dict[str, Any]]) -> Dict[str, Any]:
    n = len(per_prompt)
    row = {
        "method": method,
        "budget": "all" if budget is None else budget,
        "kept": sum(r["kept"] for r in per_prompt) / n,
        "agreement": sum(r["agreement"] for r in per_prompt) / n,
        "first_divergence": [r["first_divergence"] for r in per_prompt],
        "identical": sum(r["first_divergence"] is None for r in per_prompt),
        "prompts": n,
        "per_prompt": per_prompt,
    }
    if all("forced_agreement" in r for r in per_prompt):
        row["forced_agreement"] = sum(r["forced_agreement"] for r in per_prompt) / n
    return row


def _row_line(r: Dict[str, Any]) -> str:
    forced = f" forced {r['forced_agreement']:.3f}" if "forced_agreement" in r else ""
    return (f"{r['method']:<20} budget {str(r['budget']):>4}: kept {r['kept']:.3f} agreement {r['agreement']:.3f}{forced}"
            f" first divergence {r['first_divergence']}")


def _server_methods(client: Client) -> Optional[set]:
    """The server's method names (from the error a bad name gets), or None if unknown."""
    try:
        client.create_session({"layers": 1, "qHeads": 1, "kvHeads": 1, "headDim": 8}, method="-")
    except KvrecallError as e:
        m = re.search(r"one of: (.*)$", e.message)
        if m:
            return {x.strip() for x in m.group(1).split(",")}
    return None


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)} (model on {device}); host {platform.node() or 'unknown'}, {os.cpu_count()} CPUs"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)"


# --- output ---------------------------------------------------------------


def to_markdown(r: Dict[str, Any]) -> str:
    p = r["params"]
    lens = [x["tokens"] for x in r["prompts"]]
    lines = [
        "# Sparse decoding through kvrecall vs dense: greedy token agreement",
        "",
        f"Model: {r['model']}. Device: {r['device']}; torch {r['torch']}, transformers {r['transformers']}; "
        f"kvrecall server {r['server'].get('version')} ({r['server'].get('backend')} backend).",
        "",
        f"{len(lens)} prompts of {', '.join(map(str, lens))} tokens (TinyStories-like text, with BOS), "
        f"{r['new_tokens']} tokens decoded greedily. The prompt is pushed as a kvrecall document (K/V f16 and its "
        f"query rows, queryStride {p['queryStride']}); the session attaches it; prefill is local and dense; every decode "
        f"step of every layer is answered by kvrecall. Sinks {p['sinks']}, window {p['window']}, ef {p['ef'] or 'method default'}; "
        "budget = retrieved prompt tokens per kv head (\"full\": the whole prompt, ef = prompt length). "
        f"Dense reference: {r['dense']}.",
        "",
        "kept = tokens attended / context tokens (server stats, all steps and layers); agreement = fraction of generated "
        "positions equal to dense; first divergence per prompt (- = none); forced = teacher-forced agreement "
        "(fed the dense tokens, the share of steps whose greedy choice is dense's).",
        "",
        *([f"Command: `{r['command']}`" + (f" ({r['jobs']} processes)" if r.get("jobs") else ""), ""] if r.get("command") else []),
        "| method | budget | kept | agreement | identical | first divergence | forced |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in r["rows"]:
        fd = ", ".join("-" if d is None else str(d) for d in row["first_divergence"])
        forced = f"{row['forced_agreement']:.3f}" if "forced_agreement" in row else ""
        lines.append(f"| {row['method']} | {row['budget']} | {row['kept']:.3f} | {row['agreement']:.3f} | "
                     f"{row['identical']}/{row['prompts']} | {fd} | {forced} |")
    fp = [x["fp32_kv_agreement"]["agreement"] for x in r["prompts"]]
    lines += ["", f"For scale: plain float32 K/V (no f16 rounding) vs the dense reference: agreement "
                  f"{', '.join(f'{a:.3f}' for a in fp)} per prompt."]
    if r.get("not_run"):
        lines += ["", "Not run (time limit): " + ", ".join(f"{x['method']} {x['budget']}" for x in r["not_run"]) + "."]
    if r["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f['method']} budget {f.get('budget')}: {f['error']}" for f in r["failures"]]
    else:
        lines += ["", "No method failed."]
    return "\n".join(lines) + "\n"


# --- server ---------------------------------------------------------------


class LocalServer:
    """`node dist/cli/cli.js serve` of this checkout on a free port, temporary data."""

    def __init__(self, node: str = "node", root: Optional[str] = None, timeout: float = 60.0):
        root = root or os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
        cli = os.path.join(root, "dist", "cli", "cli.js")
        if not os.path.isfile(cli):
            raise FileNotFoundError(f"{cli} not found: build the server first (npx tsc -p tsconfig.json)")
        self.data = tempfile.mkdtemp(prefix="kvrecall-demo-")
        self.proc = subprocess.Popen([node, cli, "serve", "--port", "0", "--data", self.data], cwd=root,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline, log = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            log += line
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                return
        self.close()
        raise RuntimeError(f"the kvrecall server did not start:\n{log}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.data, ignore_errors=True)


def _run_jobs(a: argparse.Namespace, url: str) -> Dict[str, Any]:
    """Runs the methods split over `a.jobs` child processes (this module, one
    server) and merges their results in the order of `a.methods`."""
    methods = [m for m in a.methods.split(",") if m]
    jobs = max(1, min(a.jobs, len(methods) + (0 if a.no_exact else 1)))
    groups: List[List[str]] = [[] for _ in range(jobs)]
    # The exact row counts as one method's work: it goes to the first group, the methods to the rest first.
    for i, m in enumerate(methods):
        groups[(i + (0 if a.no_exact else 1)) % jobs].append(m)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    tmp = tempfile.mkdtemp(prefix="kvrecall-demo-jobs-")
    procs = []
    try:
        for i, group in enumerate(groups):
            no_exact = a.no_exact or i > 0
            if not group and no_exact:
                continue
            out = os.path.join(tmp, f"{i}.json")
            args = [sys.executable, "-m", "kvrecall.demo_sparse", "--url", url, "--new", str(a.new), "--budgets", a.budgets,
                    "--sinks", str(a.sinks), "--window", str(a.window), "--ef", str(a.ef), "--methods", ",".join(group) or ",",
                    "--prompts", str(a.prompts), "--out", out, "--quiet"]
            args += [x for f in a.prompt_file for x in ("--prompt-file", f)]
            args += (["--model-dir", a.model_dir] if a.model_dir else []) + (["--token", a.token] if a.token else [])
            args += (["--device", a.device] if a.device else []) + (["--no-exact"] if no_exact else [])
            args += (["--no-full"] if a.no_full else []) + (["--no-forced"] if a.no_forced else [])
            args += ["--stop-at", repr(a.stop_at)] if a.stop_at is not None else []
            procs.append((out, subprocess.Popen(args, env=env, stderr=subprocess.STDOUT)))
        parts = []
        for out, proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"a demo job failed (exit {proc.returncode}): {' '.join(proc.args)}")
            with open(out) as f:
                parts.append(json.load(f))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    merged = dict(parts[0])
    order = {m: i for i, m in enumerate(["exact", *methods])}
    merged["rows"] = sorted((row for p in parts for row in p["rows"]), key=lambda row: order.get(row["method"], len(order)))
    merged["failures"] = [f for p in parts for f in p["failures"]]
    merged["not_run"] = [x for p in parts for x in p.get("not_run", [])]
    merged["jobs"] = len(procs)
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("KVRECALL_URL"), help="a running kvrecall server")
    ap.add_argument("--serve", action="store_true", help="start this checkout's server (node dist/cli/cli.js) instead")
    ap.add_argument("--node", default="node")
    ap.add_argument("--token", default=os.environ.get("KVRECALL_TOKEN"))
    ap.add_argument("--model-dir", default=None, help="stories260K folder (default: env KVRECALL_STORIES260K, else $KVRECALL_MODELS_DIR/stories260K, else <repo>/../shared/data/models/stories260K)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} built-in prompts")
    ap.add_argument("--prompt-file", action="append", default=[], help="a text file to use as a prompt (repeatable; replaces the built-in ones)")
    ap.add_argument("--new", type=int, default=64, help="tokens to decode")
    ap.add_argument("--methods", default=",".join(SPARSE_METHODS))
    ap.add_argument("--budgets", default="8,16,32,64,128")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--ef", type=int, default=0, help="search effort (0: each method's default)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-budget rows")
    ap.add_argument("--no-forced", action="store_true", help="skip teacher-forced agreement")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact row")
    ap.add_argument("--quiet", action="store_true", help="do not print the table at the end")
    ap.add_argument("--jobs", type=int, default=1, help="run the methods in this many processes at once (one server)")
    ap.add_argument("--time-limit", type=float, default=None, help="start no new (method, budget) after this many seconds")
    ap.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help="torch device of the model (default cuda when available)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the table as markdown here")
    a = ap.parse_args(argv)

    if a.time_limit is not None and a.stop_at is None:
        a.stop_at = time.time() + a.time_limit
    model_dir = find_model_dir(a.model_dir)
    if model_dir is None:
        ap.error("stories260K not found: pass --model-dir or set KVRECALL_STORIES260K or KVRECALL_MODELS_DIR")
    prompts = [open(f, encoding="utf-8").read() for f in a.prompt_file] or PROMPTS[: a.prompts]
    server = LocalServer(a.node) if a.serve else None
    url = server.url if server else a.url
    if not url:
        ap.error("pass --url (or set KVRECALL_URL), or --serve")
    try:
        if a.jobs > 1:
            r = _run_jobs(a, url)
        else:
            client = Client(url, token=a.token)
            r = run_demo(client, model_dir, prompts=prompts, methods=[m for m in a.methods.split(",") if m],
                         budgets=[int(b) for b in a.budgets.split(",") if b], new=a.new, sinks=a.sinks, window=a.window,
                         ef=a.ef, full=not a.no_full, teacher_forced=not a.no_forced, exact=not a.no_exact, device=a.device,
                         stop_at=a.stop_at)
    finally:
        if server:
            server.close()
    r["command"] = " ".join(["python3 -m kvrecall.demo_sparse", *(argv if argv is not None else sys.argv[1:])])
    md = to_markdown(r)
    if not a.quiet:
        print(md)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
