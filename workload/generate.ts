// generateWorkload: the stages in order. Keys and values first (the needles'
// query weights are solved against the stored keys), then the needles
// planted into them, decode queries, the needle queries aimed, and prefill
// queries.
import { CHUNK, decodeTable, generateKeysValues } from './kv.js';
import { aimNeedleQueries, placeNeedles, plantNeedles } from './needles.js';
import { makePlan } from './plan.js';
import { decodeQueries, prefillQueries, QueryParts } from './queries.js';
import type { Workload, WorkloadSpec } from './types.js';

/**
 * The workload of `spec`, byte for byte the same for the same spec.
 * onProgress gets the fraction done (key/value chunks, then one unit per kv
 * head of prefill queries). Throws RangeError on a malformed spec.
 */
export function generateWorkload(spec: WorkloadSpec, onProgress?: (fraction: number) => void): Workload {
  const plan = makePlan(spec);
  const { tokens, kvHeads, d, dtype } = plan;
  const totalWork = Math.ceil(tokens / CHUNK) + kvHeads;
  let done = 0;
  const tick = () => onProgress?.(++done / totalWork);

  const placed = placeNeedles(plan, spec.needles);
  const { keys, values } = generateKeysValues(plan, tick);
  const table = decodeTable(dtype);
  plantNeedles(plan, keys, placed, table);
  const parts = new QueryParts(plan);
  const { decodeQ, decodeSpan } = decodeQueries(plan, parts);
  aimNeedleQueries(plan, keys, placed, decodeQ, table);
  const prefill = prefillQueries(plan, parts, spec.prefillQueries ?? Math.floor(tokens / 16), tick);

  return {
    spec: { ...spec },
    knobs: plan.k,
    dtype,
    scale: 1 / Math.sqrt(d),
    keys,
    values,
    ...prefill,
    decodeQ,
    needles: placed.needles,
    spanStart: plan.spans.start,
    spanTopic: plan.spans.topic,
    decodeSpan,
    salient: plan.salient,
  };
}
