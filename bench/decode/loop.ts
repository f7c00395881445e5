// The per-token loop: for each step and layer, every lane (transport, with
// its sessions) sends every session the same attend (the step's q
// [qHeads, d] f32 and the new token's k, v [kvHeads, d] f16), timed from
// the client, the lanes taking turns at going first (with exactApart, the
// exact sessions' whole decode runs first, alone, and their replies are
// kept for the comparisons below); then, outside the
// timed calls, each lane's answers are checked bit for bit against the
// first lane's, each method's output is compared with its lane's exact
// session's and, on the sampled layers, its selection is judged against
// float64 exact attention.
import { tensor, type AttendReply } from '../../clients/ts/client.js';
import type { Needle } from '../../workload/index.js';
import { exactAttention, relativeErrors } from '../quality.js';
import { mean } from '../stats.js';
import { Judge } from './judge.js';
import { sameAnswer, turnOrder, type Lane } from './lanes.js';
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
  /** Ask every call for its host stages (`return: ['timing']`). */
  timing?: boolean;
  /**
   * The exact sessions' whole decode first, then the other sessions' (their
   * fidelity against exact's kept replies): no method's call comes right
   * after a dense attend over the whole context, as an LLM server's would
   * not. Interleaved at 1M on the H100 host, half of wave's calls followed
   * one of exact's (29 ms), and came cold. Single-call lanes only: a batch
   * lane's batches keep exact's step.
   */
  exactApart?: boolean;
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

/** Float64 exact attention of sample sm's kv head at step s, what every lane's selections are judged against. */
function judgeOf(p: DecodePlan, sm: Sample, s: number, l: number): Judge {
  const { qHeads: Q, kvHeads: K, headDim: d } = p.shape, G = Q / K;
  const q = p.decodeData[l].q[s].subarray(sm.head * G * d, (sm.head + 1) * G * d);
  return new Judge(exactAttention(q, G, sm.keys, sm.values, { headDim: d, dtype: 'f16', tokens: p.tokens + s + 1 }), p.budgetTokens);
}

/** Judges each reply's selection of sample sm's kv head (and the exact kernel's output) against float64 attention. */
function judgeSample(p: DecodePlan, sm: Sample, judge: Judge, replies: Map<Run, AttendReply>, exact: Run, s: number, l: number): void {
  const { qHeads: Q, kvHeads: K, headDim: d } = p.shape, G = Q / K;
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

/**
 * Each lane's answers against the first lane's, method by method: a
 * difference is counted on the run and the first one described.
 */
function checkSame(lanes: Lane[], replies: Map<Run, AttendReply>[], s: number, l: number): void {
  for (let i = 1; i < lanes.length; i++)
    lanes[i].runs.forEach((run, m) => {
      const a = replies[0].get(lanes[0].runs[m]), b = replies[i].get(run);
      if (!a || !b) return;
      const d = sameAnswer(a, b);
      if (!d) return;
      run.mismatches++;
      if (run.mismatch) return;
      run.mismatch = `step ${s}, layer ${l}: via ${run.via} ${d} from via ${lanes[0].via}`;
      log(`${run.method}: ${run.mismatch}`);
    });
}

/**
 * Who goes first at step s, layer l (lanes, and sessions in each: turnOrder):
 * one place on each layer and each step. With s × layers + l, the call after
 * a sampled layer's fidelity work fell to the same session every step
 * wherever the layers and the sessions (or lanes) share a factor: with 2
 * layers, exact and wave, wave's layer-1 call always, so on the H100 host
 * all its plain calls came cold (RPC 1.07 ms against exact's 0.59).
 */
export const turnOf = (s: number, l: number) => s + l;

/** The timed decode of every step and layer over every lane; each lane's runs[0] is its exact session. */
export async function decodeSteps(p: DecodePlan, lanes: Lane[]): Promise<void> {
  const { layers: L, qHeads: Q, kvHeads: K, headDim: d } = p.shape, steps = p.steps;
  const sampleLayers = new Set(p.samples.map((x) => x.layer));
  const dbar = new Progress(`decode ${fmtTokens(p.tokens)}`, steps * L);
  // The next exchange is the first after the fidelity work (recorded apart: bench/decode/run.ts CallKind).
  let afterWork = false;
  const workMs: number[] = [];
  // Per lane, exact's replies by s × L + l (exactApart).
  const exactReplies = p.exactApart ? await exactPass(p, lanes) : undefined;
  for (let s = 0; s < steps; s++) {
    for (let l = 0; l < L; l++) {
      const judged = sampleLayers.has(l);
      const ld = p.decodeData[l], turn = turnOf(s, l);
      const body = { layer: l, q: tensor('f32', [Q, d], ld.q[s]), k: tensor('f16', [K, d], ld.k[s]), v: tensor('f16', [K, d], ld.v[s]) };
      const replies = new Array<Map<Run, AttendReply>>(lanes.length);
      for (let j = 0; j < lanes.length; j++) {
        const i = turnOrder([...lanes.keys()], turn)[j], lane = lanes[i], exact = lane.runs[0];
        const apart = exactReplies && lane.via !== 'batch';
        replies[i] = await lane.step(s, body, turn, retOf(p, judged, exact), afterWork && j === 0, apart ? (run) => run !== exact : undefined);
        const kept = exactReplies?.[i][s * L + l];
        if (kept) replies[i].set(exact, kept);
      }
      afterWork = false;
      // Fidelity, after the timed calls.
      checkSame(lanes, replies, s, l);
      lanes.forEach((lane, i) => outputErrors(replies[i], lane.runs[0], Q));
      if (judged) {
        const tj = now();
        for (const sm of p.samples.filter((x) => x.layer === l)) {
          const judge = judgeOf(p, sm, s, l);
          lanes.forEach((lane, i) => judgeSample(p, sm, judge, replies[i], lane.runs[0], s, l));
        }
        lanes.forEach((lane, i) => countNeedles(ld.needles, replies[i], lane.runs[0], s));
        workMs.push(now() - tj);
        if (now() - tj > 500) await settle();
        afterWork = true;
      }
      dbar.update(s * L + l + 1, `step ${s + 1}/${steps}`);
    }
  }
  dbar.finish();
  if (workMs.length) log(`fidelity work between timed calls: ${workMs.length} passes, mean ${mean(workMs).toFixed(0)} ms`);
}

/** What a call returns: the selection on judged layers (not exact's), the host stages with --timing. */
const retOf = (p: DecodePlan, judged: boolean, exact: Run) => (run: Run) =>
  [...(judged && run !== exact ? (['out', 'selection'] as const) : (['out'] as const)), ...(p.timing ? (['timing'] as const) : [])];

/**
 * exactApart's first pass: every lane's exact session alone through every
 * step and layer; its replies, [lane][s × layers + l]. A batch lane's exact
 * session stays in its batches (they stand for a server's running batch).
 */
async function exactPass(p: DecodePlan, lanes: Lane[]): Promise<AttendReply[][]> {
  const { layers: L, qHeads: Q, kvHeads: K, headDim: d } = p.shape;
  const bar = new Progress(`exact pass ${fmtTokens(p.tokens)}`, p.steps * L);
  const kept = lanes.map(() => new Array<AttendReply>(p.steps * L));
  for (let s = 0; s < p.steps; s++)
    for (let l = 0; l < L; l++) {
      const ld = p.decodeData[l];
      const body = { layer: l, q: tensor('f32', [Q, d], ld.q[s]), k: tensor('f16', [K, d], ld.k[s]), v: tensor('f16', [K, d], ld.v[s]) };
      for (const [i, lane] of turnOrder(lanes, turnOf(s, l)).map((x) => [lanes.indexOf(x), x] as const)) {
        if (lane.via === 'batch') continue;
        const exact = lane.runs[0];
        const r = (await lane.step(s, body, 0, retOf(p, false, exact), false, (run) => run === exact)).get(exact);
        if (r) kept[i][s * L + l] = r;
      }
      bar.update(s * L + l + 1, `step ${s + 1}/${p.steps}`);
    }
  bar.finish();
  return kept;
}
