// The per-token loop: for each step and layer, every session gets the same
// attend (the step's q [qHeads, d] f32 and the new token's k, v
// [kvHeads, d] f16), timed from the client; then, outside the timed calls,
// each method's output is compared with the exact session's and, on the
// sampled layers, its selection is judged against float64 exact attention.
import { KvrecallRequestError, tensor, type AttendReply, type KvrecallClient } from '../../clients/ts/client.js';
import type { Needle } from '../../workload/index.js';
import { exactAttention, relativeErrors } from '../quality.js';
import { mean } from '../stats.js';
import { Judge } from './judge.js';
import type { LayerDecode, Sample } from './layer-data.js';
import type { Shape } from './options.js';
import type { Run } from './run.js';
import { fmtTokens, log, now, Progress, settle } from './util.js';

export interface DecodePlan {
  shape: Shape;
  tokens: number;
  steps: number;
  budgetTokens: number;
  decodeData: LayerDecode[];
  samples: Sample[];
}

/**
 * One attend per session for step s of layer l. Sessions take turns going
 * first, so whatever the call after the fidelity work pays (a GC pause, a
 * cold socket) is spread over the methods.
 */
async function timedCalls(client: KvrecallClient, p: DecodePlan, runs: Run[], s: number, l: number, judged: boolean): Promise<Map<Run, AttendReply>> {
  const { layers: L, qHeads: Q, kvHeads: K, headDim: d } = p.shape;
  const ld = p.decodeData[l], exact = runs[0];
  const body = { layer: l, q: tensor('f32', [Q, d], ld.q[s]), k: tensor('f16', [K, d], ld.k[s]), v: tensor('f16', [K, d], ld.v[s]) };
  const replies = new Map<Run, AttendReply>();
  const turn = (s * L + l) % runs.length;
  for (const run of [...runs.slice(turn), ...runs.slice(0, turn)]) {
    if (run.error) continue;
    const ret: ('out' | 'selection')[] = judged && run !== exact ? ['out', 'selection'] : ['out'];
    const t = now();
    try {
      const r = await client.attend(run.sid, { ...body, return: ret });
      run.record(s, now() - t, r);
      replies.set(run, r);
    } catch (e) {
      run.error = `attend (step ${s}, layer ${l}): ${e instanceof KvrecallRequestError ? e.message : (e as Error).stack}`;
      log(`${run.method}: ${run.error}`);
    }
  }
  return replies;
}

/** Every method's output error against the exact session's reply. */
function outputErrors(replies: Map<Run, AttendReply>, exact: Run, qHeads: number): void {
  const ex = replies.get(exact);
  if (!ex) return;
  for (const [run, r] of replies) {
    if (run === exact) continue;
    const e = relativeErrors(r.out, ex.out, qHeads);
    run.outErr.push(mean([...e]));
    run.outErrWorst = Math.max(run.outErrWorst, ...e);
  }
}

/** Judges each reply's selection of sample sm's kv head (and the exact kernel's output) against float64 attention. */
function judgeSample(p: DecodePlan, sm: Sample, replies: Map<Run, AttendReply>, exact: Run, s: number, l: number): void {
  const { qHeads: Q, kvHeads: K, headDim: d } = p.shape, G = Q / K;
  const q = p.decodeData[l].q[s].subarray(sm.head * G * d, (sm.head + 1) * G * d);
  const judge = new Judge(exactAttention(q, G, sm.keys, sm.values, { headDim: d, dtype: 'f16', tokens: p.tokens + s + 1 }), p.budgetTokens);
  for (const [run, r] of replies) {
    if (run === exact) {
      const e = relativeErrors(r.out.subarray(sm.head * G * d, (sm.head + 1) * G * d), judge.ex.out, G);
      run.kernelErr = Math.max(run.kernelErr ?? 0, ...e);
      continue;
    }
    const sel = r.selection?.[sm.head];
    if (!sel) continue;
    try {
      const j = judge.judge(sel);
      if (j.dup) run.duplicates++;
      run.recall.push(j.recall);
      run.oracleRecall.push(j.oracle);
      run.topK.push(j.topK);
    } catch (e) {
      run.error = `selection check (step ${s}, layer ${l}): ${(e as Error).message}`;
      log(`${run.method}: ${run.error}`);
    }
  }
}

/** A needle is hit when its step's selection of its kv head holds its position. */
function countNeedles(needles: Needle[], replies: Map<Run, AttendReply>, exact: Run, s: number): void {
  for (const n of needles) {
    if (n.step !== s) continue;
    for (const [run, r] of replies) {
      if (run === exact || !r.selection) continue;
      run.needles++;
      if (r.selection[n.head].includes(n.position)) run.needlesHit++;
    }
  }
}

/** The timed decode of every step and layer; runs[0] is the exact session. */
export async function decodeSteps(client: KvrecallClient, p: DecodePlan, runs: Run[]): Promise<void> {
  const { layers: L, qHeads: Q } = p.shape, steps = p.steps;
  const exact = runs[0];
  const sampleLayers = new Set(p.samples.map((x) => x.layer));
  const dbar = new Progress(`decode ${fmtTokens(p.tokens)}`, steps * L);
  for (let s = 0; s < steps; s++) {
    for (let l = 0; l < L; l++) {
      const judged = sampleLayers.has(l);
      const replies = await timedCalls(client, p, runs, s, l, judged);
      // Fidelity, after the timed calls.
      outputErrors(replies, exact, Q);
      if (judged) {
        const tj = now();
        for (const sm of p.samples.filter((x) => x.layer === l)) judgeSample(p, sm, replies, exact, s, l);
        countNeedles(p.decodeData[l].needles, replies, exact, s);
        if (now() - tj > 500) await settle();
      }
      dbar.update(s * L + l + 1, `step ${s + 1}/${steps}`);
    }
  }
  dbar.finish();
}
