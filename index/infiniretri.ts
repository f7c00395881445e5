// `infiniretri` (InfiniRetri, arXiv 2502.12962): the model's own attention,
// read chunk by chunk, decides which tokens are kept as evidence
// (index/infiniretri-read.ts). What stands in for the model's attention:
//  - at seal, the document's prefill query rows (the kv route's `q`) read
//    it; the kept set (1% of its tokens, best first) is the document's
//    artifact (index/infiniretri-artifact.ts), loaded, not re-read, when a
//    session attaches the document;
//  - in a session, the session's question (its own prefill rows' queries;
//    without them, the decode steps' rows so far) reads each document
//    again, and extends the document's evidence: a tenth of the session's
//    budget is the seal's best, the rest the question's best.
// Decode attends the kept ids (not copies) with sinks, window and the
// session's own tokens. The question's read is done once per layer and
// redone when more question rows arrive; without them, when the decode
// steps read so far have doubled (1, 2, 4, ... steps; past STEP_ROWS steps,
// every STEP_ROWS steps over the last STEP_ROWS): a question that arrives as
// decode steps (a prompt's tail decoded token by token) is read soon after
// it is asked, where the first step alone would fix the evidence before it
// (kvrecall-code-13M, 8K bytes, the pass key asked in the last 11 of 32
// decoded bytes, default budget: 1/8 keys found where dense found 8/8,
// bench/results/model-vm-defaults.md; 8/8 with the steps' reads,
// model-vm-defaults-fixes.md). Each document is read as its own
// stream (a softmax never spans two documents) and gets a share of the
// budget by size.
import type { BuildInput, HeadIndex, HeadIndexBuilder, HeadKeys, LayerContext, RetrievalMethod, SearchParams, SearchResult, Selection, SelectionPart } from './method.js';
import { decodeKept, encodeKept } from './infiniretri-artifact.js';
import { readChunks, type Kept } from './infiniretri-read.js';
import { budgetShares, inside, staticRanges } from './static-plus-retrieved.js';

/** The seal's read: kept share of the document, phrase half-width, and the smallest chunk. */
export const SEAL_KEEP = 0.01;
export const SEAL_SPAN = 2;
export const SEAL_CHUNK = 4096;
/**
 * Share of a session's budget given to the seal's evidence when the
 * session's question read too. Small: on the generator the seal's evidence
 * (what the document's own queries dwell on, mostly its heavy hitters) cost
 * error at every share against the question's (64K, the question = the
 * decode steps' rows: share 0 / 0.1 / 0.25 / 0.5 → 41.5 / 42.3 / 44.1 /
 * 47.6%; the question = the first step's rows only: 53.3 / 54.2 / 56.2 /
 * 61.8%), except in the broad configuration, where the document's
 * queries read the same topic runs as the answer (half: 47.7%, a tenth:
 * 50.9%); a tenth keeps facts the document's queries asked about at
 * little cost (bench/results/retrieval-*65536-infiniretri.md).
 */
export const SEAL_SHARE = 0.1;

/** A document head's seal-time evidence. search() ignores the query: the evidence is what the document's own queries read. */
export class KeptHead implements HeadIndex {
  constructor(readonly kept: Kept) {}
  search(_q: Float32Array, _group: number, k: number): SearchResult {
    return { ids: this.kept.ids.subarray(0, Math.min(k, this.kept.ids.length)), scanned: 0 };
  }
}

/** The seal's read of one kv head with its prefill queries (none: an empty kept set). */
export async function sealRead(input: BuildInput): Promise<Kept & { chunk: number }> {
  const keep = Math.min(input.tokens, Math.max(64, Math.ceil(SEAL_KEEP * input.tokens)));
  // A chunk at least twice the cache, so re-reading the cache costs at most half a pass more.
  const chunk = Math.max(SEAL_CHUNK, 2 * keep);
  const kept = await readChunks(input, input.queries, input.queryCount, { chunk, span: SEAL_SPAN, budget: keep, scale: 1 / Math.sqrt(input.headDim) });
  return { ...kept, chunk };
}

export const infiniretriBuilder: HeadIndexBuilder = {
  async build(input: BuildInput): Promise<Uint8Array> {
    const kept = await sealRead(input);
    return encodeKept({ ...kept, tokens: input.tokens, span: SEAL_SPAN });
  },
  load(bytes: Uint8Array, keys: HeadKeys): HeadIndex {
    return new KeptHead(decodeKept(bytes, keys.tokens));
  },
};

/** The seal's best (up to `sealShare` of the budget, when the question read anything), then the question's best, to `budget` ids, ascending. */
export function mergeKept(seal: Kept, question: Kept, budget: number, sealShare = SEAL_SHARE): Int32Array {
  const out = new Set<number>();
  const fromSeal = question.ids.length > 0 ? Math.ceil(budget * sealShare) : budget;
  for (const t of seal.ids) if (out.size < fromSeal) out.add(t);
  for (const t of question.ids) if (out.size < budget) out.add(t);
  for (const t of seal.ids) if (out.size < budget) out.add(t);
  return Int32Array.from(out).sort();
}

/** Decode steps whose rows a session keeps as its question when it has none of its own (bounds memory and a read's cost). */
export const STEP_ROWS = 256;

interface Retained {
  questionRows: number;
  /** [segment][kv head]: retained rows, ascending. */
  ids: Int32Array[][];
  scanned: number;
}

/** A question as the rows of one kv head's query heads. */
type QuestionRows = (head: number) => { queries: Float32Array; queryCount: number };

/**
 * Without question rows of its own, a session's question is its decode
 * steps' rows: per kv head, the group's rows of the last STEP_ROWS steps.
 */
class StepRows {
  steps = 0;
  private readonly rows: Float32Array[];
  /** Per kv head, the row the last add overwrote (past STEP_ROWS steps), for undo. */
  private readonly overwritten: Float32Array[];
  private undoable = false;

  constructor(private readonly kvHeads: number, private readonly width: number) {
    this.rows = Array.from({ length: kvHeads }, () => new Float32Array(STEP_ROWS * width));
    this.overwritten = Array.from({ length: kvHeads }, () => new Float32Array(width));
  }

  add(q: Float32Array): void {
    const at = (this.steps % STEP_ROWS) * this.width, full = this.steps >= STEP_ROWS;
    for (let h = 0; h < this.kvHeads; h++) {
      if (full) this.overwritten[h].set(this.rows[h].subarray(at, at + this.width));
      this.rows[h].set(q.subarray(h * this.width, (h + 1) * this.width), at);
    }
    this.steps++;
    this.undoable = true;
  }

  /** Takes the last add back (its step failed): the rows are as before it, so the retry's row counts once. */
  readonly undo = (): void => {
    if (!this.undoable) return;
    this.undoable = false;
    this.steps--;
    if (this.steps < STEP_ROWS) return;
    const at = (this.steps % STEP_ROWS) * this.width;
    for (let h = 0; h < this.kvHeads; h++) this.rows[h].set(this.overwritten[h], at);
  };

  /** Whether the steps so far call for a new read: they doubled, or STEP_ROWS more arrived. */
  due(): boolean {
    return this.steps <= STEP_ROWS ? (this.steps & (this.steps - 1)) === 0 : this.steps % STEP_ROWS === 0;
  }

  question(group: number): QuestionRows {
    const steps = Math.min(this.steps, STEP_ROWS);
    return (h) => ({ queries: this.rows[h].subarray(0, steps * this.width), queryCount: steps * group });
  }
}

async function retain(ctx: LayerContext, question: QuestionRows, questionRows: number, p: SearchParams): Promise<Retained> {
  const d = ctx.headDim, scale = 1 / Math.sqrt(d);
  const docs = ctx.segments.length - 1;
  const docTokens = ctx.offsets[docs];
  const shares = budgetShares(ctx, p.budget);
  const ids: Int32Array[][] = [];
  for (let s = 0; s < docs; s++) {
    const seg = ctx.segments[s];
    const budget = Math.min(seg.tokens, shares[s]);
    const perHead: Int32Array[] = [];
    for (let h = 0; h < ctx.kvHeads; h++) {
      const { queries, queryCount } = question(h);
      const keys = { keys: seg.k[h], tokens: seg.tokens, headDim: seg.headDim, dtype: seg.dtype };
      const seal = (ctx.indexes[s]?.[h] as KeptHead | undefined)?.kept ?? { ids: new Int32Array(0), scores: new Float32Array(0) };
      const read = seg.tokens === 0 || budget === 0 ? seal : await readChunks(keys, queries, queryCount, { chunk: p.chunk, span: p.span, budget, scale });
      perHead.push(mergeKept(seal, read, budget));
    }
    ids.push(perHead);
  }
  return { questionRows, ids, scanned: docTokens };
}

export const infiniretri: RetrievalMethod = {
  name: 'infiniretri',
  builder: infiniretriBuilder,
  async select(ctx: LayerContext, q: Float32Array, p: SearchParams): Promise<Selection> {
    let r = ctx.memo.get('infiniretri') as Retained | undefined;
    // Read every step: the session's rows come joined once (PrefillQueries.rows), not copied per read.
    const asked = ctx.question(0).queryCount;
    let question: QuestionRows = ctx.question;
    let due = !r || r.questionRows !== asked;
    let steps: StepRows | undefined;
    if (asked === 0) {
      const G = ctx.qHeads / ctx.kvHeads;
      steps = ctx.memo.get('infiniretri-steps') as StepRows | undefined;
      if (!steps) ctx.memo.set('infiniretri-steps', (steps = new StepRows(ctx.kvHeads, G * ctx.headDim)));
      steps.add(q);
      question = steps.question(G);
      due ||= steps.due();
    }
    let scanned = 0;
    if (!r || due) {
      try {
        r = await retain(ctx, question, asked, p);
      } catch (e) {
        steps?.undo();
        throw e;
      }
      ctx.memo.set('infiniretri', r);
      scanned = r.scanned;
    }
    const parts: SelectionPart[] = [];
    ctx.segments.forEach((segment, s) => {
      const ranges = staticRanges(ctx, s, p);
      for (const [begin, end] of ranges) parts.push({ segment, begin, end });
      if (s < r.ids.length) parts.push({ segment, ids: r.ids[s].map((ids) => ids.filter((id) => !inside(ranges, id))) });
    });
    // A step that fails after this select takes its row back (decode-step.ts), as a failed retain does above.
    return steps ? { parts, scanned, undo: steps.undo } : { parts, scanned };
  },
};
