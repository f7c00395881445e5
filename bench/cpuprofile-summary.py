#!/usr/bin/env python3
"""Summarise a V8 .cpuprofile (node --cpu-prof): self and inclusive time by function.

    python3 bench/cpuprofile-summary.py PROFILE [--top N] [--match TEXT] [--after TEXT]

--after TEXT: only the samples from the first one with a frame containing TEXT
on its stack (e.g. stepDocument: the decode, not the preload and seal before it).

Why: bench/gpu-visit.sh's decode-prof stage runs the server under the sampling
profiler to find the JS time around a device step; the device has no browser
to open the profile in, and the question is a ranked list, not a flame graph.
Self = samples whose top frame is the function; inclusive = samples with the
function anywhere on the stack (counted once per sample). (idle) and
(program) are V8's own: the loop asleep, and native work outside JS.
"""
import json
import sys
from collections import Counter


def main():
    args = sys.argv[1:]
    top = int(args[args.index('--top') + 1]) if '--top' in args else 40
    match = args[args.index('--match') + 1] if '--match' in args else None
    after = args[args.index('--after') + 1] if '--after' in args else None
    path = args[0]
    prof = json.load(open(path))
    nodes = {n['id']: n for n in prof['nodes']}
    parent = {}
    for n in prof['nodes']:
        for c in n.get('children', []):
            parent[c] = n['id']

    def name(n):
        cf = n['callFrame']
        url = cf.get('url', '').rsplit('/', 2)
        where = '/'.join(url[-2:]) if cf.get('url') else ''
        return f"{cf['functionName'] or '(anonymous)'} {where}:{cf.get('lineNumber', -1) + 1}" if where else (cf['functionName'] or '(anonymous)')

    samples = prof['samples']
    deltas = prof.get('timeDeltas', [0] * len(samples))

    def stack(s):
        i = s
        while i is not None:
            yield name(nodes[i])
            i = parent.get(i)

    if after:
        first = next((j for j, s in enumerate(samples) if any(after in k for k in stack(s))), len(samples))
        samples, deltas = samples[first:], deltas[first:]
    total_us = sum(deltas)
    self_us, incl_us = Counter(), Counter()
    for s, dt in zip(samples, deltas):
        self_us[name(nodes[s])] += dt
        for k in set(stack(s)):
            incl_us[k] += dt
    print(f"{path}: {len(samples)} samples, {total_us / 1e6:.2f} s")
    busy = total_us - self_us.get('(idle)', 0)
    print(f"busy (not idle): {busy / 1e6:.3f} s")
    for title, c in (('self', self_us), ('inclusive', incl_us)):
        print(f"\n## {title} time, top {top} (ms, % of busy; (idle) and (root) exceed it)")
        shown = [(k, v) for k, v in c.most_common() if not match or match in k][:top]
        for k, v in shown:
            print(f"{v / 1e3:10.1f} {100 * v / max(busy, 1):6.2f}%  {k}")

if __name__ == '__main__':
    main()
