#!/usr/bin/env python3
"""Stage table of bench:decode stream calls from the temporary marks of bench/decode-rpc-trace.patch.

Apply the patch (git apply bench/decode-rpc-trace.patch), build (npx tsc -p tsconfig.json), run the server
(node dist/cli/cli.js serve ...) and the bench (node dist/bench/decode.js --url ...) with KVR_TR=<dir>/tr-<name>
in each one's environment: each process writes <dir>/tr-<name>.<pid>.json ([mark, CLOCK_MONOTONIC ms, ...]) at
its exit (stop the server with SIGINT or SIGTERM, not SIGKILL). Then, in <dir>:

  python3 decode-rpc-trace.py 'tr-*.json' [more globs: one table each]

A call is b_start:<method>:<kind> .. b_end in the bench (kind: bench/decode/run.ts CallKind: plain, sampled,
afterWork); the server's marks in between (by time: both processes read the same clock) split its wall time."""
import glob, json, statistics as st, sys
from collections import defaultdict


def load(files):
    marks = []
    for f in files:
        a = json.load(open(f))
        marks += [(a[i + 1], a[i]) for i in range(0, len(a), 2)]
    marks.sort()
    calls, cur = [], None
    for t, k in marks:
        if k.startswith('b_start'):
            cur = {'kind': k[8:], 'b_start': t}
            calls.append(cur)
            continue
        if cur is None:
            continue
        cur.setdefault(k, t)
        if k == 'b_end':
            cur['done'] = 1
            cur = None
    return [c for c in calls if 'done' in c]


SEGS = [
    ('client: call → request in the server', 'b_start', 's_data'),
    ('server: frame read → step starts', 's_data', 's_t0'),
    ('server: the step (stats.ms)', 's_t0', 's_t1'),
    ('server: step ends → answer frame filled', 's_t1', 's_filled'),
    ('server write → client reads', 's_filled', 'c_data'),
    ('client: read → await resolved', 'c_data', 'b_end'),
]


def table(name, files):
    g = defaultdict(list)
    for c in load(files):
        g[c['kind']].append(c)
    kinds = sorted(g)
    print(f"\n**{name}** (µs, p50 over the calls; mean in brackets)\n")
    print('| stage | ' + ' | '.join(f"{k} ({len(g[k])})" for k in kinds) + ' |')
    print('| --- | ' + ' | '.join('---:' for _ in kinds) + ' |')
    for n, a, b in SEGS + [('wall', 'b_start', 'b_end')]:
        cells = []
        for k in kinds:
            d = [(c[b] - c[a]) * 1000 for c in g[k] if a in c and b in c]
            cells.append(f"{st.median(d):.0f} ({st.mean(d):.0f})" if d else '—')
        print(f"| {n} | " + ' | '.join(cells) + ' |')
    cells = []
    for k in kinds:
        d = [((c['b_end'] - c['b_start']) - (c['s_t1'] - c['s_t0'])) * 1000 for c in g[k] if 's_t0' in c and 's_t1' in c]
        cells.append(f"**{st.median(d):.0f}** ({st.mean(d):.0f})" if d else '—')
    print("| RPC (wall − stats.ms) | " + ' | '.join(cells) + ' |')


for pattern in sys.argv[1:] or ['tr-*.json']:
    files = glob.glob(pattern)
    if not files:
        sys.exit(f"no trace files match {pattern}")
    table(pattern, files)
