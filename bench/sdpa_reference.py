"""torch scaled_dot_product_attention on the dense-decode shape of bench/dense-vs-sdpa.ts.

    python3 bench/sdpa_reference.py --out sdpa.json [--reps 50] [--tokens 1048576,131072] [--dims 128,64]

One layer, one query token: q [1, 32, 1, d], K and V [1, 8, T, d], f16, all on the
GPU. GQA through ``enable_gqa=True`` (no copy of K/V: each kv head serves its 4
query heads), the backend left to torch; that is the number the TypeScript bench
compares with. For reference it also times each backend forced through
``sdpa_kernel`` (those that take the shape), and the grouping trick
``q.view(1, 8, 4, d)`` against K/V as plain multi-head attention (the 4 query
heads of a kv head as 4 query rows; exact for one non-causal query token).
Timing: CUDA events around each call, 5 warm-ups, then the p50 (nearest rank,
the lower median) of --reps calls, the same rule as the TypeScript side.
Which kernels ran is read once per case with torch.profiler.
"""

import argparse
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F


def p50(xs):
    s = sorted(xs)
    return s[max(0, math.ceil(0.5 * len(s)) - 1)]


def time_fn(fn, reps):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ms.append(e0.elapsed_time(e1))
    return {"p50": p50(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


def kernels_of(fn):
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        return names[:6]
    except Exception as e:  # recorded, not fatal
        return [f"profiler failed: {e!r}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tokens", default="1048576,131072")
    ap.add_argument("--dims", default="128,64")
    a = ap.parse_args()
    dev = torch.device("cuda")
    q_heads, kv_heads = 32, 8
    g = q_heads // kv_heads
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "shape": {"qHeads": q_heads, "kvHeads": kv_heads, "queryTokens": 1, "dtype": "f16"},
        "gqa": "enable_gqa=True (no K/V copy); backend chosen by torch",
        "timing": f"CUDA events per call, 5 warm-ups, p50 (nearest rank) of {a.reps}",
        "cases": [],
    }
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    for d in [int(x) for x in a.dims.split(",")]:
        for t in [int(x) for x in a.tokens.split(",")]:
            torch.manual_seed(0)
            q = torch.randn(1, q_heads, 1, d, device=dev, dtype=torch.float16)
            k = torch.randn(1, kv_heads, t, d, device=dev, dtype=torch.float16)
            v = torch.randn(1, kv_heads, t, d, device=dev, dtype=torch.float16)
            scale = 1 / math.sqrt(d)
            case = {"headDim": d, "tokens": t, "kvBytes": 2 * kv_heads * t * d * 2}

            def gqa():
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

            ref = gqa()
            case["sdpa_enable_gqa"] = time_fn(gqa, a.reps)
            case["sdpa_enable_gqa"]["kernels"] = kernels_of(gqa)
            for name, be in backends.items():
                try:
                    with sdpa_kernel([be]):
                        out = gqa()
                        err = (out.float() - ref.float()).abs().max().item()
                        r = time_fn(gqa, a.reps)
                    r["maxAbsVsDefault"] = err
                    case[f"sdpa_enable_gqa_{name}"] = r
                except Exception as e:  # a backend that does not take the shape
                    case[f"sdpa_enable_gqa_{name}"] = {"error": str(e).splitlines()[0][:200]}
            qg = q.view(1, kv_heads, g, d)

            def grouped():
                return F.scaled_dot_product_attention(qg, k, v, scale=scale)

            out = grouped().reshape(1, q_heads, 1, d)
            case["sdpa_grouped_rows"] = time_fn(grouped, a.reps)
            case["sdpa_grouped_rows"]["maxAbsVsDefault"] = (out.float() - ref.float()).abs().max().item()
            case["sdpa_grouped_rows"]["kernels"] = kernels_of(grouped)
            print(json.dumps(case), flush=True)
            result["cases"].append(case)
            del q, k, v, qg, ref, out
            torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"sdpa_reference: wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
