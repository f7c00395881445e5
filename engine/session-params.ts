// A session's parameters from its creation body: the method's search
// parameters, whether it estimates what the method leaves out, and an
// optional per-layer policy. Everything is checked before anything is
// created, so a bad body changes nothing.
import { budgetTokens, type SearchParams } from '../index/method.js';
import { DEFAULT_CODE_SHARE, RETRIEVAL_ATTENTION } from '../index/retrieval-attention.js';
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

/** The search parameters in the body over the method's defaults (`method`: the session's method's name). */
export function parseSearchParams(body: Record<string, unknown>, defaults: SearchParams, method = ''): SearchParams {
  const params = { ...defaults };
  for (const key of ['budget', 'sinks', 'window', 'ef', 'chunk', 'span'] as const) {
    const v = body[key];
    if (v === undefined) continue;
    const ok = key === 'budget' ? budgetValue(v) !== undefined : typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 1 << 30;
    if (!ok) throw invalid(key === 'budget' ? `budget must be ${BUDGET_RULE}` : `${key} must be a non-negative integer`);
    params[key] = v as number;
  }
  parseWalk(body, params, method);
  return params;
}

const isShare = (v: unknown): v is number => typeof v === 'number' && v > 0 && v <= 1;

/**
 * retrieval-attention's walk (SearchParams.codeWalk, codeScan, codeShare, scanShare, scanKeep).
 * Unlike ef, chunk and span, which methods that do not use them ignore, these
 * are refused for any other method: a session that asked to trade speed
 * for recall should not silently get the usual search. With the code walk on,
 * codeShare is filled in (DEFAULT_CODE_SHARE) so the session says what it
 * reads; scanShare stays absent unless given (its default depends on each
 * search's k: index/retrieval-attention.ts, walkOptions), and so does scanKeep
 * (absent: the code scan's one pass over the 4-bit codes).
 */
function parseWalk(body: Record<string, unknown>, params: SearchParams, method: string): void {
  const { codeWalk, codeScan, codeShare, scanShare, scanKeep } = body;
  const given = (['codeWalk', 'codeScan', 'codeShare', 'scanShare', 'scanKeep'] as const).find((k) => body[k] !== undefined);
  if (given === undefined) return;
  if (method !== RETRIEVAL_ATTENTION) throw invalid(`${given} is an option of ${RETRIEVAL_ATTENTION}'s graph search, not of method ${method}`);
  if (codeWalk !== undefined && typeof codeWalk !== 'boolean') throw invalid('codeWalk must be true or false');
  if (codeScan !== undefined && typeof codeScan !== 'boolean') throw invalid('codeScan must be true or false');
  if (codeScan === true && codeWalk === true) throw invalid('codeScan and codeWalk are two searches over the codes: set one');
  if (codeShare !== undefined && !isShare(codeShare)) throw invalid('codeShare must be a share in (0, 1] of a document\'s tokens (the codes its search reads at most)');
  if (scanShare !== undefined && !isShare(scanShare)) throw invalid('scanShare must be a share in (0, 1] of a document\'s tokens (the keys its search scores exactly at most)');
  if (scanKeep !== undefined && !isShare(scanKeep)) throw invalid('scanKeep must be a share in (0, 1] of a document\'s tokens (the keys the code scan\'s PQ first pass keeps for the 4-bit codes)');
  if (codeShare !== undefined && codeWalk !== true) throw invalid('codeShare caps the code walk: set codeWalk: true');
  if (scanKeep !== undefined && codeScan !== true) throw invalid('scanKeep is the code scan\'s PQ first pass: set codeScan: true');
  if (codeWalk === true && params.ef > 0) throw invalid(`ef ${params.ef} sets the beam walk's width; the code walk has none (its caps are codeShare and scanShare): leave ef at 0`);
  if (codeScan === true && params.ef > 0) throw invalid(`ef ${params.ef} sets the beam walk's width; the code scan has none (its cap is scanShare): leave ef at 0`);
  if (codeScan === true) params.codeScan = true;
  if (codeWalk === true) {
    params.codeWalk = true;
    params.codeShare = codeShare ?? DEFAULT_CODE_SHARE;
  }
  if (scanShare !== undefined) params.scanShare = scanShare;
  if (scanKeep !== undefined) params.scanKeep = scanKeep;
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
