# The wave step's threshold select (native/cuda/wave_select.cuh) modelled in Python
# against a sorted reference: random cases with ties, caps, exclusions and
# tied orders. Run: python3 bench/wave_select_model.py (prints ok). Keep it in
# step with the kernels when their logic changes.
import random
def select_ref(elems,target,cap):
    # elems: list of (ord, index, w); sorted; cut at first where cumW>=target or count>=cap
    if target<=0 or cap<=0: return {}
    es=sorted(e for e in elems if e[0]!=0xffffffff)
    out={}; W=0
    for r,(o,i,w) in enumerate(es):
        if W+w>=target or r+1>=cap:
            out[i]=min(target,W+w)-W; return out
        out[i]=w; W+=w
    return out
def select_new(elems,target,cap):
    if target<=0 or cap<=0: return {}
    E=[e for e in elems if e[0]!=0xffffffff]
    hist={}
    for o,i,w in E:
        b=o>>16; x=hist.setdefault(b,[0,0]); x[0]+=w; x[1]+=1
    w=n=0; found=None
    for b in range(65536):
        if b in hist:
            bw,bn=hist[b]
            if w+bw>=target or n+bn>=cap: found=b; break
            w+=bw; n+=bn
    if found is None:
        return {i:wt for o,i,wt in E}
    buf=[((o<<32)|i,wt) for o,i,wt in E if o>>16==found]
    prefix=found<<48; wB,cB=w,n
    for shift in range(40,-1,-8):
        high=((1<<64)-1)<<(shift+8) & ((1<<64)-1)
        hw=[0]*256; hn=[0]*256
        for k,wt in buf:
            if k&high!=prefix: continue
            d=(k>>shift)&255; hw[d]+=wt; hn[d]+=1
        at=255; ww,mm=wB,cB
        for d in range(256):
            if hn[d]>0 and (ww+hw[d]>=target or mm+hn[d]>=cap): at=d; break
            ww+=hw[d]; mm+=hn[d]
        prefix|=at<<shift; wB,cB=ww,mm
    wcut=[wt for k,wt in buf if k==prefix][0]
    total=min(target,wB+wcut); take=total-wB
    out={}
    for o,i,wt in E:
        k=(o<<32)|i
        if k<prefix: out[i]=wt
        elif k==prefix: out[i]=take
    return out


import random

def clz32(x): return 32-x.bit_length()
def select_new(elems,target,cap,BINB=12,NIDX=None):
    if target<=0 or cap<=0: return {}
    E=[e for e in elems if e[0]!=0xffffffff]
    if not E: return {}
    mn=min(e[0] for e in E); mx=max(e[0] for e in E); span=mx-mn
    shift=0 if span==0 else max(0,32-clz32(span)-BINB)
    rel=lambda o,i:((o-mn)<<32)|i
    hist={}
    for o,i,w in E:
        b=(o-mn)>>shift; x=hist.setdefault(b,[0,0]); x[0]+=w; x[1]+=1
    w=n=0; found=None
    for b in range(1<<BINB):
        if b in hist:
            bw,bn=hist[b]
            if w+bw>=target or n+bn>=cap: found=b; break
            w+=bw; n+=bn
    if found is None: return {i:wt for o,i,wt in E}
    buf=[(rel(o,i),wt) for o,i,wt in E if (o-mn)>>shift==found]
    top=32+shift; prefix=found<<top; wB,cB=w,n
    while top>0:
        sd=max(0,top-8); width=top-sd
        high=(((1<<64)-1)<<top)&((1<<64)-1)
        hw=[0]*256; hn=[0]*256
        for k,wt in buf:
            if k&high!=prefix: continue
            d=(k>>sd)&((1<<width)-1); hw[d]+=wt; hn[d]+=1
        at=None; ww,mm=wB,cB
        for d in range(1<<width):
            if hn[d]>0 and (ww+hw[d]>=target or mm+hn[d]>=cap): at=d; break
            ww+=hw[d]; mm+=hn[d]
        prefix|=at<<sd; wB,cB=ww,mm; top=sd
        ib=(NIDX-1).bit_length() if NIDX>1 else 0
        if sd<=32 and sd>ib: top=ib
        if hn[at]==1:
            hi2=(((1<<64)-1)<<top)&((1<<64)-1)
            prefix=[k for k,wt in buf if k&hi2==prefix][0]; break
    wcut=[wt for k,wt in buf if k==prefix][0]
    total=min(target,wB+wcut); take=total-wB
    out={}
    for o,i,wt in E:
        k=rel(o,i)
        if k<prefix: out[i]=wt
        elif k==prefix: out[i]=take
    return out
random.seed(2)
for trial in range(4000):
    n=random.randint(1,300)
    kind=random.random()
    if kind<0.3: ords=[random.choice([0x3f800000,0x3f800001,0x40000000]) for _ in range(n)]
    elif kind<0.6: ords=[random.randint(0,0xfffffffe) for _ in range(n)]
    elif kind<0.8: ords=[0x80000000+random.randint(0,2000) for _ in range(n)]
    else: ords=[0x80000000]*n
    ords=[o if random.random()>0.05 else 0xffffffff for o in ords]
    elems=[(o,i,random.randint(1,20)) for i,o in enumerate(ords)]
    tot=sum(e[2] for e in elems)
    target=random.randint(0,tot+5); cap=random.randint(0,n+3)
    a=select_ref(elems,target,cap); b=select_new(elems,target,cap,BINB=random.choice([4,12]),NIDX=n)
    a={k:v for k,v in a.items() if v}; b={k:v for k,v in b.items() if v}
    assert a==b,(trial,target,cap)
print("ok")
