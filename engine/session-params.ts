// A session's parameters from its creation body: the method's search
// parameters, whether it estimates what the method leaves out, and an
// optional per-layer policy. Everything is checked before anything is
// created, so a bad body changes nothing.
import { budgetTokens, type SearchParams } from '../index/method.js';
import { invalid } from '../core/errors.js';

/** What a layer's steps use: its budget (tokens, or a fraction below 1 of the context) and whether it estimates. */
export interface LayerParams {
  budget: number;
  estimate: boolean;
}

const BUDGET_RULE = 'a non-negative integer (tokens) or a fraction in (0, 1) of the context';
const LAYER_KEYS = new Set(['budget', 'estimate']);

/** A budget as sessions take it, or undefined when it is not one. */
function budgetValue(v: unknown): number | undefined {
  if (typeof v !== 'number') return undefined;
  if (v > 0 && v < 1) return v;
  return Number.isInteger(v) && v >= 0 && v <= 1 << 30 ? v : undefined;
}

/** The search parameters in the body over the method's defaults. */
export function parseSearchParams(body: Record<string, unknown>, defaults: SearchParams): SearchParams {
  const params = { ...defaults };
  for (const key of ['budget', 'sinks', 'window', 'ef', 'chunk', 'span'] as const) {
    const v = body[key];
    if (v === undefined) continue;
    const ok = key === 'budget' ? budgetValue(v) !== undefined : typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 1 << 30;
    if (!ok) throw invalid(key === 'budget' ? `budget must be ${BUDGET_RULE}` : `${key} must be a non-negative integer`);
    params[key] = v as number;
  }
  return params;
}

/**
 * The per-layer policy: `layers` is absent (every layer takes the session's
 * budget and estimate) or a list of one map per layer, each with an optional
 * `budget` and `estimate` overriding the session's for that layer. The first
 * layers of a real model attend broadly (bench/results/model-*.md), where a
 * larger budget or the estimate pays and the later layers need less.
 */
export function parseLayers(value: unknown, layers: number, budget: number, estimate: boolean): LayerParams[] {
  const same = Array.from({ length: layers }, () => ({ budget, estimate }));
  if (value === undefined) return same;
  if (!Array.isArray(value) || value.length !== layers)
    throw invalid(`layers must be a list of ${layers} maps (one per model layer, each with an optional budget and estimate), not ${Array.isArray(value) ? `${value.length} entries` : typeof value}`);
  return value.map((entry: unknown, l) => {
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) throw invalid(`layers[${l}] must be a map with an optional budget and estimate`);
    const e = entry as Record<string, unknown>;
    const unknown = Object.keys(e).find((k) => !LAYER_KEYS.has(k));
    if (unknown !== undefined) throw invalid(`layers[${l}] has ${JSON.stringify(unknown)}; a layer may set only budget and estimate`);
    const b = e.budget === undefined ? budget : budgetValue(e.budget);
    if (b === undefined) throw invalid(`layers[${l}].budget must be ${BUDGET_RULE}`);
    if (e.estimate !== undefined && typeof e.estimate !== 'boolean') throw invalid(`layers[${l}].estimate must be true or false`);
    return { budget: b, estimate: (e.estimate as boolean | undefined) ?? estimate };
  });
}

/** The most any layer reads beyond sinks and window, in tokens of a context of `tokens` (what a pool must hold). */
export function largestBudget(layers: LayerParams[], tokens: number): number {
  return layers.reduce((m, l) => Math.max(m, budgetTokens(l.budget, tokens)), 0);
}
