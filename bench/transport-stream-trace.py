#!/usr/bin/env python3
"""Where one stream attend's overhead goes, stage by stage, from traces of both ends.

Input: the JSONL traces the temporary instrumentation writes
(bench/transport-stream-trace.patch against the tree that brought this file,
bench/transport-stream-trace-7652582.patch against the one before it: `git
apply` one, build, then `N=2000 KVR_TRACE=<dir>/c-<tag>.jsonl
S_TRACE=<dir>/s-<tag>.jsonl node bench/trace-stream.mjs`). Each line is one
call: CLOCK_MONOTONIC microseconds (process.hrtime, the same clock in both
processes) at each stage, the client's line and the server's joined by
order (one connection, one call at a time). Calls alternate f32 and f16 in
blocks of 25; the first WARM of each run are dropped (the JIT is still
tiering the path up: at 512 tokens the overhead falls from 220 µs over the
first 700 calls to 122 µs after 3000).

Usage: transport-stream-trace.py DIR before=TAG,TAG after=TAG,TAG [warm=1000] [json=OUT]
Prints the markdown table of per-stage p50s (µs); json= also writes them.
"""
import json
import statistics
import sys

# (name, from mark, to mark). Marks that a tree does not have in a stage's
# place are set at the same point (after: c_packed = c_filled, the request
# being packed straight into its frame; s_send = s_packed, the answer packed
# by packAttendAnswer before the send).
STAGES = [
    ('client: attend() called → request packed', 'c_call', 'c_packed'),
    ('client: frame header, buffer, join', 'c_packed', 'c_filled'),
    ('client: socket.write (syscall)', 'c_filled', 'c_written'),
    ('request on the wire: write returned → server JS has the bytes', 'c_written', 's_data'),
    ('server: WebSocket parse → message', 's_data', 's_msg'),
    ('server: unpackView', 's_msg', 's_unpacked'),
    ('server: frame checks → sessions.attend called', 's_unpacked', 's_call'),
    ('server: session lookup, KeyedQueue → step starts', 's_call', 's_t0'),
    ('server: engine step (stats.ms)', 's_t0', 's_t1'),
    ('server: step result → handle resumes (promise turns)', 's_t1', 's_resumed'),
    ('server: metrics, answer object (before) / packed answer (after)', 's_resumed', 's_answer'),
    ('server: answer → send (answer queue)', 's_answer', 's_send'),
    ('server: packParts(answer) (before)', 's_send', 's_packed'),
    ('server: frame buffer, header, join / fill', 's_packed', 's_filled'),
    ('server: socket.write (syscall)', 's_filled', 's_written'),
    ('answer on the wire: write returned → client JS has the bytes', 's_written', 'c_data'),
    ('client: WebSocket parse (+ copy, before) → message', 'c_data', 'c_msg'),
    ('client: unpackView', 'c_msg', 'c_unpacked'),
    ('client: id lookup → resolve', 'c_unpacked', 'c_resolve'),
    ('client: resolve → attend resumes', 'c_resolve', 'c_resumed'),
    ('client: attendReply (out, lse copied out)', 'c_resumed', 'c_reply'),
    ('client: attend returns → caller resumes', 'c_reply', 'c_done'),
]


def load(d, tag, warm):
    c = [json.loads(line) for line in open(f'{d}/c-{tag}.jsonl')]
    s = [json.loads(line) for line in open(f'{d}/s-{tag}.jsonl')]
    assert len(c) == len(s), (tag, len(c), len(s))
    return [{**a, **b} for a, b in zip(c, s)][warm:]


def main():
    d = sys.argv[1]
    opts = dict(a.split('=', 1) for a in sys.argv[2:])
    warm = int(opts.get('warm', 1000))
    sides = ['before', 'after']
    rows = {side: sum((load(d, t, warm) for t in opts[side].split(',')), []) for side in sides}
    res = {}
    for side in sides:
        for kind in (32, 16):
            k = [r for r in rows[side] if r['c_kind'] == kind]
            res[side, kind] = {name: statistics.median([r[b] - r[a] for r in k]) for name, a, b in STAGES}
            res[side, kind]['over'] = statistics.median([r['c_done'] - r['c_call'] - r['c_ms'] * 1000 for r in k])
            res[side, kind]['n'] = len(k)
    cols = [(s, k) for k in (32, 16) for s in sides]
    print('| stage | ' + ' | '.join(f'{s} f{k}' for s, k in cols) + ' |')
    print('| --- |' + ' ---: |' * len(cols))
    for name, _, _ in STAGES:
        print(f'| {name} | ' + ' | '.join(f'{res[c][name]:.1f}' for c in cols) + ' |')
    print('| **overhead (client wall − stats.ms)** | ' + ' | '.join(f"**{res[c]['over']:.1f}**" for c in cols) + ' |')
    print('| calls | ' + ' | '.join(str(res[c]['n']) for c in cols) + ' |')
    if 'json' in opts:
        out = {f'{s}_f{k}': res[s, k] for s, k in cols}
        with open(opts['json'], 'w') as f:
            json.dump({'warm': warm, 'runs': {side: opts[side].split(',') for side in sides}, 'p50us': out}, f, indent=1)
            f.write('\n')


main()
