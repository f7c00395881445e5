#!/usr/bin/env python3
"""Stage table of bench:decode stream calls from the temporary marks of bench/decode-rpc-trace.patch
(apply it, add tr('b_start:' + method + ':' + (sampled ? 'J' : 'P')) and tr('b_end') around the await in
bench/decode/lanes.ts singleSteps, build, run the server and the bench with KVR_TR=<dir>/tr-...; each process
writes <prefix>.<pid>.json: [mark, CLOCK_MONOTONIC ms, ...]). Run in the folder of the traces."""
import json,sys,statistics as st
from collections import defaultdict
def load(files):
    marks=[]
    for f in files:
        a=json.load(open(f)); marks+=[(a[i+1],a[i]) for i in range(0,len(a),2)]
    marks.sort(); calls=[]; cur=None
    for t,k in marks:
        if k.startswith('b_start'): cur={'kind':k[8:],'b_start':t}; calls.append(cur); continue
        if cur is None: continue
        cur.setdefault(k,t)
        if k=='b_end': cur['done']=1; cur=None
    return [c for c in calls if 'done' in c]
segs=[('client: call → request in the server','b_start','s_data'),('server: frame read → step starts','s_data','s_t0'),('server: step ends → answer frame filled','s_t1','s_filled'),('server write → client reads','s_filled','c_data'),('client: read → await resolved','c_data','b_end')]
import glob
sets={'in-process':glob.glob('tr-in.*.json'),'own process':glob.glob('tr-out-*.json')}
kinds=['exact:P','wave:P','nosa:P','wave:J','nosa:J']
names={'exact:P':'exact, plain','wave:P':'wave, plain','nosa:P':'nosa, plain','wave:J':'wave, sampled','nosa:J':'nosa, sampled'}
for sname,files in sets.items():
    g=defaultdict(list)
    for c in load(files): g[c['kind']].append(c)
    print(f"\n**Server {sname}** (µs, p50 over the calls; mean in brackets)\n")
    print('| stage | '+' | '.join(f"{names[k]} ({len(g[k])})" for k in kinds)+' |')
    print('| --- | '+' | '.join('---:' for k in kinds)+' |')
    for n,a,b in segs:
        cells=[]
        for k in kinds:
            d=[(c[b]-c[a])*1000 for c in g[k] if a in c and b in c]
            cells.append(f"{st.median(d):.0f} ({st.mean(d):.0f})")
        print(f"| {n} | "+' | '.join(cells)+' |')
    cells=[]
    for k in kinds:
        d=[((c['b_end']-c['b_start'])-(c['s_t1']-c['s_t0']))*1000 for c in g[k]]
        cells.append(f"**{st.median(d):.0f}** ({st.mean(d):.0f})")
    print("| RPC (wall − stats.ms) | "+' | '.join(cells)+' |')
