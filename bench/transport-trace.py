#!/usr/bin/env python3
"""Where a decode call's overhead goes, from timestamped traces of both ends.

Input: the JSONL traces written by the temporary instrumentation in
bench/transport-trace.patch (against 916c6b8, with api/batch-pack.ts added
from the commit that brought this file: `git apply` it, build, then run
`N=40 KVR_MODE=<0|1> SERVER_TRACE=<dir>/tr-s-<tag>.jsonl
KVRECALL_TRACE_FILE=<dir>/tr-c-<tag>.jsonl node dist/bench/trace-batch.js`,
KVR_MODE 0 being the generic batch answer and 1 api/batch-pack.ts). Each
line is one call: CLOCK_MONOTONIC microseconds (process.hrtime, the same
clock in both processes) at each stage, the server's line and the client's
joined by order. Calls cycle: one stream attend (f32), a stream batch of 32
(f32), a stream batch of 32 (f16).

Usage: transport-trace.py DIR OUT_BASE 'LOADS' before=0a,0b after=1a,1b [metrics=m]
"""
import json
import statistics
import sys

KINDS = {1: 'stream attend (f32)', 2: 'stream batch of 32 (f32)', 3: 'stream batch of 32 (f16)'}
WARM = 9  # calls dropped at the start of each run (3 of each kind)


def load(d, tag):
    s = [json.loads(line) for line in open(f'{d}/tr-s-{tag}.jsonl')]
    c = [json.loads(line) for line in open(f'{d}/tr-c-{tag}.jsonl')]
    assert len(s) == len(c), (tag, len(s), len(c))
    return [{**a, **b} for a, b in zip(s, c)][WARM:]


def med(xs):
    return round(statistics.median(xs))


def summary(rows, kind):
    rows = [x for x in rows if x['c_kind'] == kind]
    b0, b1 = ('s_b0', 's_b1') if kind > 1 else ('s_step0', 's_stepN')
    over = [x['c_done'] - x['c_t0'] - x['c_ms'] for x in rows]
    # Moving: from the sender's write call until the receiver holds the whole message (kernel copies, loopback, waking the receiver, its reads).
    req = [x['s_msg'] - x['c_joined'] for x in rows]
    ans = [x['c_msg'] - x['s_joined'] for x in rows]
    return {
        'calls': len(rows),
        'overheadUs': med(over),
        'movingRequestUs': med(req),
        'movingAnswerUs': med(ans),
        'movingShare': round(statistics.median([(r + a) / o for r, a, o in zip(req, ans, over)]), 2),
        'clientEncodeUs': med([x['c_joined'] - x['c_t0'] for x in rows]),
        'serverDecodeUs': med([x[b0] - x['s_msg'] for x in rows]),
        'serverEncodeUs': med([x['s_joined'] - x[b1] for x in rows]),
        'clientDecodeUs': med([x['c_done'] - x['c_msg'] for x in rows]),
        'clientWriteSyscallUs': med([x['c_written'] - x['c_joined'] for x in rows]),
        'serverWriteSyscallUs': med([x['s_written'] - x['s_joined'] for x in rows]),
        'serverWriteToClientFirstReadUs': med([x['c_first'] - x['s_written'] for x in rows]),
        'serverReadsPerRequest': med([x['s_chunks'] for x in rows]),
    }


def main():
    d, out, loads = sys.argv[1], sys.argv[2], sys.argv[3]
    groups = dict(a.split('=', 1) for a in sys.argv[4:])
    result = {'machine': 'AMD EPYC, 2 cores (the shared VM)', 'loadAverage': loads, 'warmupDropped': WARM, 'kinds': KINDS, 'sides': {}}
    for side in ('before', 'after'):
        rows = [x for tag in groups[side].split(',') for x in load(d, tag)]
        result['sides'][side] = {'runs': groups[side], **{str(k): summary(rows, k) for k in KINDS}}
    if 'metrics' in groups:
        rows = [x for x in load(d, groups['metrics']) if x['c_kind'] > 1]
        result['afterBatchReadStatsMsUs'] = med([x['s_metrics'] - x['s_awaited'] for x in rows])
    cols = [('overheadUs', 'overhead'), ('movingRequestUs', 'moving the request'), ('movingAnswerUs', 'moving the answer'), ('movingShare', 'moving share'),
            ('clientEncodeUs', 'client encode'), ('serverDecodeUs', 'server decode'), ('serverEncodeUs', 'server encode'), ('clientDecodeUs', 'client decode')]
    lines = [
        '# Where a decode call\'s overhead goes, traced at both ends (AMD EPYC, 2 cores)',
        '',
        'Temporary timestamps (bench/transport-trace.patch, CLOCK_MONOTONIC in both processes) at each stage of a call over the stream: the client\'s',
        'encode, its write, the server\'s reads, decode, the batch (server `stats.ms`, left out), the answer\'s encode, its write, the client\'s reads and',
        'decode. Calls cycle one stream attend (f32), a batch of 32 (f32), a batch of 32 (f16); one layer, 32 q / 8 kv heads, d=128, exact over 4K tokens.',
        f'Before: the generic answer (answer objects, packParts, joined into the frame); after: api/batch-pack.ts. Runs alternated before, after, ...; load average {loads}',
        '(other sessions\' work: every number here is inflated by it; the shares and the before/after differences are what it shows). p50 in µs.',
        '',
        '"Moving" is from the sender\'s write call until the receiver holds the whole message: the kernel\'s copies, loopback, waking the receiver',
        '(asleep through the batch) and its reads. "Encode"/"decode" are the JS work outside it: client encode = request packed and joined into',
        'its frame; server decode = frame unpacked to the batch\'s start; server encode = the batch\'s end to the answer frame ready to write;',
        'client decode = the whole answer in hand to the results returned.',
        'Each call\'s parts add up to its overhead; their medians do not add up to the median overhead: under this load a call\'s time lost to other',
        'processes lands in one part or another (the tails are long), so compare a part across sides and calls, not the parts with the total.',
        '',
        '| side | call | ' + ' | '.join(c[1] for c in cols) + ' |',
        '| --- | --- | ' + ' | '.join('---:' for _ in cols) + ' |',
    ]
    for side in ('before', 'after'):
        for k, name in KINDS.items():
            s = result['sides'][side][str(k)]
            lines.append(f'| {side} | {name} | ' + ' | '.join(str(s[c[0]]) for c in cols) + ' |')
    b, a = result['sides']['before'], result['sides']['after']
    lines += [
        '',
        f'Write syscalls (before, p50): the client\'s request {b["3"]["clientWriteSyscallUs"]} µs for the f16 batch ({b["3"]["serverReadsPerRequest"]:.0f} server reads of it), '
        f'{b["1"]["clientWriteSyscallUs"]} for one step; the server\'s answer {b["3"]["serverWriteSyscallUs"]} and {b["1"]["serverWriteSyscallUs"]}; '
        f'from the end of the server\'s write to the client\'s first read {b["3"]["serverWriteToClientFirstReadUs"]} and {b["1"]["serverWriteToClientFirstReadUs"]}.',
    ]
    # What a batch costs beyond one step, split: moving its bytes, and the JS work (sums of the parts' medians).
    js = lambda k: k['clientEncodeUs'] + k['serverDecodeUs'] + k['serverEncodeUs'] + k['clientDecodeUs']
    mv = lambda k: k['movingRequestUs'] + k['movingAnswerUs']
    result['batchExtraOverStep'] = {name: {'movingUs': mv(b[k]) - mv(b['1']), 'jsUs': js(b[k]) - js(b['1'])} for k, name in (('2', 'f32'), ('3', 'f16'))}
    for e in result['batchExtraOverStep'].values():
        e['movingShare'] = round(e['movingUs'] / (e['movingUs'] + e['jsUs']), 2)
    x = result['batchExtraOverStep']
    lines += ['', f'What a batch costs beyond one step (before, sums of the parts\' medians): f32 {x["f32"]["movingUs"]} µs moving and {x["f32"]["jsUs"]} µs JS '
              f'(moving {x["f32"]["movingShare"]} of it), f16 {x["f16"]["movingUs"]} and {x["f16"]["jsUs"]} ({x["f16"]["movingShare"]}).']
    if 'afterBatchReadStatsMsUs' in result:
        lines += ['', f'Right after a batch, reading the 32 steps\' `stats.ms` (the metrics loop, 32 property reads) took {result["afterBatchReadStatsMsUs"]} µs p50: '
                  'the batch streamed 32 × 16 MB of K/V through the caches, so the first touch of anything after it misses (the same work in a warm process: < 1 µs).']
    lines.append('')
    with open(f'{out}.json', 'w') as f:
        json.dump(result, f, indent=1)
        f.write('\n')
    with open(f'{out}.md', 'w') as f:
        f.write('\n'.join(lines))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
