"""Dump kvrecall-code-13M's real keys and queries for bench/retrieval-model.ts (issue #15).

One held-out pass-key context per length (kvdecode.make_trial's draw: heldout corpus seed 0, trial_rng(seed,
length, 0)), prefilled whole in numpy. The last --steps positions are the teacher-forced decode positions: under
causal attention a full prefill's q at those positions equals what decode_step computes there, so one pass gives
every tensor. Per layer L and kv head h, under --out/ctx<length>/:

- `L<L>h<h>.keys.npy`    [n_doc, 64] float16: the document's keys, post-RoPE, as kvrecall stores them;
- `L<L>h<h>.prefill.npy` [4 * ceil(n_doc / stride), 64] float32: the group's prefill queries at t % stride == 0
  (bench:model's queryStride), q head by q head, as engine/document-indexes.ts hands them to a kv head's index;
- `L<L>h<h>.decode.npy`  [steps, 4, 64] float32: the decode positions' queries of the group's 4 q heads;
- with --values, `L<L>h<h>.values.npy` [n_doc, 64] float16: the document's values (bench/retrieval-model.ts then
  reports the output error of each selection against exact attention);
- `meta.json`: lengths, plant offset, stride, the model's softmax scale.

Run with Debian's numpy: /usr/bin/python3 bench/model/dump_qk.py --lengths 32768,16384 --out /tmp/kvrecall-qk
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import heldout  # noqa: E402
from kvdecode import trial_rng  # noqa: E402
from model import Model  # noqa: E402

LINE = len(b"\x1fpass key: 00000\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,16384")
    ap.add_argument("--steps", type=int, default=48, help="teacher-forced decode positions at the end")
    ap.add_argument("--stride", type=int, default=4, help="prefill query stride (bench:model pushes every 4th)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/kvrecall-qk")
    ap.add_argument("--values", action="store_true", help="also write each kv head's values")
    a = ap.parse_args()
    model = Model()
    c = model.cfg
    group = c.n_heads // c.n_kv_heads
    text = heldout.corpus(a.seed)
    for length in (int(x) for x in a.lengths.split(",")):
        rng = trial_rng(a.seed, length, 0)
        n_doc = length - a.steps
        for _ in range(1000):  # as kvdecode.make_trial: the plant inside the document
            seq, key, at = heldout.plant(text, length, rng)
            if at + LINE <= n_doc:
                break
        else:
            raise RuntimeError(f"could not plant a pass key inside a {n_doc}-byte document")
        t0 = time.perf_counter()
        pre = model.prefill(np.frombuffer(seq, np.uint8), keep_qkv=True, logits="none")
        prefill_s = time.perf_counter() - t0
        out = Path(a.out) / f"ctx{length}"
        out.mkdir(parents=True, exist_ok=True)
        for li in range(c.n_layers):
            q, k, v = pre.q[li], pre.k[li], pre.v[li]  # [qHeads, n, 64], [kvHeads, n, 64] x 2
            for h in range(c.n_kv_heads):
                qg = q[h * group:(h + 1) * group]
                np.save(out / f"L{li}h{h}.keys.npy", np.ascontiguousarray(k[h, :n_doc].astype(np.float16)))
                np.save(out / f"L{li}h{h}.prefill.npy",
                        np.ascontiguousarray(qg[:, :n_doc:a.stride].reshape(-1, c.head_dim), np.float32))
                np.save(out / f"L{li}h{h}.decode.npy", np.ascontiguousarray(qg[:, n_doc:].transpose(1, 0, 2), np.float32))
                if a.values:
                    np.save(out / f"L{li}h{h}.values.npy", np.ascontiguousarray(v[h, :n_doc].astype(np.float16)))
        meta = dict(length=length, n_doc=n_doc, steps=a.steps, stride=a.stride, seed=a.seed, plant_at=at,
                    key=key.decode(), layers=c.n_layers, kv_heads=c.n_kv_heads, group=group, head_dim=c.head_dim,
                    scale=float(model.scale), prefill_s=round(prefill_s, 1),
                    corpus="heldout.corpus(seed) (Debian python3 dist-packages unless KVRECALL_HELDOUT_* is set)")
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"[dump_qk] {length}: prefill {prefill_s:.1f} s, plant at {at}, written to {out}", flush=True)


if __name__ == "__main__":
    main()
