// Needles: keys with a feature of their own (norm needleNorm) that exactly
// one later decode query (one step, one q head) targets, at a weight solved
// from an exact scan of the head's stored keys so that the needle scores
// needleBoost logits above every other key: rank 1 by construction.
import { bytesOf, convert } from '../addon/kernels.js';
import { featureDir } from './heads.js';
import { CHUNK } from './kv.js';
import { isSalient, type Plan } from './plan.js';
import { hash32, Rng, S_NEEDLES } from './random.js';
import type { Needle } from './types.js';

/** Needles keep clear of the last tokens (a recent window reads those anyway). */
const NEEDLE_AWAY = 1024;

export interface PlacedNeedles {
  needles: Needle[];
  /** Per needle: its feature direction, pre-RoPE [d]. */
  dirs: Float64Array[];
}

/**
 * Positions (not sinks, not salient, clear of the end, one needle per key),
 * steps and q heads (at most one needle per query), feature directions;
 * round-robin over kv heads.
 */
export function placeNeedles(plan: Plan, count: number): PlacedNeedles {
  const { tokens, kvHeads, G, steps, d, sinks } = plan;
  const rng = new Rng(hash32(plan.seed, S_NEEDLES));
  const lo = sinks, hi = Math.max(lo + 1, tokens - NEEDLE_AWAY);
  const needles: Needle[] = [], dirs: Float64Array[] = [];
  const taken = new Set<number>();
  for (let n = 0; n < count; n++) {
    const head = n % kvHeads;
    const bad = (t: number) => taken.has(head * tokens + t) || isSalient(plan, t);
    let position = lo + rng.int(hi - lo);
    for (let tries = 0; bad(position) && tries < 1000; tries++) position = lo + rng.int(hi - lo);
    if (bad(position)) throw new RangeError('workload: too few tokens for the needles');
    taken.add(head * tokens + position);
    let qHead = head * G + rng.int(G), step = rng.int(steps);
    for (let tries = 0; needles.some((x) => x.qHead === qHead && x.step === step); tries++) {
      if (tries > 1000) throw new RangeError('workload: too many needles for the decode steps');
      qHead = head * G + rng.int(G);
      step = rng.int(steps);
    }
    needles.push({ head, qHead, position, step });
    const dir = new Float64Array(d);
    featureDir(rng.u32(), plan.bands.kind, dir);
    dirs.push(dir);
  }
  return { needles, dirs };
}

/** Adds needleNorm · R(p)·dir to each needle's stored key (rounded to storage once more). */
export function plantNeedles(plan: Plan, keys: Uint16Array[], placed: PlacedNeedles, table: Float32Array): void {
  const { d, rope, dtype } = plan;
  const one = new Float32Array(d), oneBits = new Uint16Array(d), rot = new Float64Array(d);
  placed.needles.forEach((nd, i) => {
    const kb = keys[nd.head], at = nd.position * d;
    rope.rotate(placed.dirs[i], rot, nd.position);
    for (let c = 0; c < d; c++) one[c] = table[kb[at + c]] + plan.k.needleNorm * rot[c];
    convert(bytesOf(one), 'f32', bytesOf(oneBits), dtype, d);
    kb.set(oneBits, at);
  });
}

/**
 * One kv head's needle queries being solved. For needle j, with a = q·k over
 * all channels and b = r·k over the semantic pairs [s0, s1) (where r, the
 * rotated needle direction, lives): w[j] = max over keys t ≠ pos[j] of
 * (a_t − ap + margin)/(bp − b_t).
 */
interface NeedleScan {
  m: number;
  d: number;
  s0: number;
  s1: number;
  /** [m, d] f32: the targeting query rows as generated, and the rotated needle directions. */
  qs: Float32Array;
  rs: Float32Array;
  pos: Int32Array;
  /** a and b of the needle's own key. */
  ap: Float64Array;
  bp: Float64Array;
  margin: number;
  w: Float64Array;
}

/** Widens w over key rows [t0, t0 + n) (f32 [n, d]). */
function scanRows(sc: NeedleScan, rows: Float32Array, n: number, t0: number): void {
  const { m, d, s0, s1, qs, rs, pos, ap, bp, margin, w } = sc, half = d >> 1;
  for (let i = 0; i < n; i++) {
    const base = i * d, t = t0 + i;
    for (let j = 0; j < m; j++) {
      if (t === pos[j]) continue;
      const qb = j * d;
      let a = 0, b = 0;
      for (let c = 0; c < d; c++) a += qs[qb + c] * rows[base + c];
      for (let c = s0; c < s1; c++) b += rs[qb + c] * rows[base + c] + rs[qb + c + half] * rows[base + c + half];
      const need = a - ap[j] + margin;
      if (need > 0) w[j] = Math.max(w[j], bp[j] > b ? need / (bp[j] - b) : Infinity);
    }
  }
}

/** The scan's inputs for kv head h's needles (mine: their indices in placed). */
function startScan(plan: Plan, kb: Uint16Array, placed: PlacedNeedles, mine: number[], decodeQ: Float32Array[], table: Float32Array): NeedleScan {
  const { d, rope, bands } = plan, m = mine.length;
  const sc: NeedleScan = {
    m,
    d,
    s0: bands.fast,
    s1: bands.slow0,
    qs: new Float32Array(m * d),
    rs: new Float32Array(m * d),
    pos: new Int32Array(m),
    ap: new Float64Array(m),
    bp: new Float64Array(m),
    margin: (plan.k.needleBoost + 0.05) * Math.sqrt(d),
    w: new Float64Array(m),
  };
  const rot = new Float64Array(d);
  mine.forEach((i, j) => {
    const nd = placed.needles[i];
    sc.qs.set(decodeQ[nd.step].subarray(nd.qHead * d, (nd.qHead + 1) * d), j * d);
    rope.rotate(placed.dirs[i], rot, nd.position);
    sc.rs.set(rot, j * d);
    sc.pos[j] = nd.position;
    for (let c = 0; c < d; c++) {
      const x = table[kb[nd.position * d + c]];
      sc.ap[j] += sc.qs[j * d + c] * x;
      sc.bp[j] += sc.rs[j * d + c] * x;
    }
  });
  return sc;
}

/**
 * Adds w·R(p)dir to each needle's targeting query row, with w solved so that
 * key p beats every other key by needleBoost logits: w·(b_p − b_t) ≥
 * a_t − a_p + margin. One pass per kv head over its stored keys, widened in
 * chunks. No other query contains the needle's feature.
 */
export function aimNeedleQueries(plan: Plan, keys: Uint16Array[], placed: PlacedNeedles, decodeQ: Float32Array[], table: Float32Array): void {
  const { d, tokens, dtype } = plan;
  const wide = new Float32Array(CHUNK * d);
  for (let h = 0; h < plan.kvHeads; h++) {
    const mine = placed.needles.flatMap((nd, i) => (nd.head === h ? [i] : []));
    if (mine.length === 0) continue;
    const kb = keys[h];
    const sc = startScan(plan, kb, placed, mine, decodeQ, table);
    for (let t0 = 0; t0 < tokens; t0 += CHUNK) {
      const n = Math.min(CHUNK, tokens - t0);
      convert(bytesOf(kb.subarray(t0 * d, (t0 + n) * d)), dtype, bytesOf(wide), 'f32', n * d);
      scanRows(sc, wide, n, t0);
    }
    mine.forEach((i, j) => {
      const nd = placed.needles[i];
      if (!Number.isFinite(sc.w[j])) throw new Error(`workload: the needle at ${nd.position} cannot be made top-1`);
      const o = decodeQ[nd.step].subarray(nd.qHead * d, (nd.qHead + 1) * d);
      for (let c = 0; c < d; c++) o[c] = sc.qs[j * d + c] + sc.w[j] * sc.rs[j * d + c];
    });
  }
}
