// A device block scorer's answers recorded and replayed, for the block
// selection benches (block-select-groups-gpu.ts, block-select-stages-gpu.ts):
// the recording scorer keeps its inner scorer's last call and answer, so the
// bench can launch the same call again one by one or time the select's host
// work with that answer handed back at once (ReplayScorer: no device call
// before it).
import type { HeadTopBlocks } from '../addon/block-scores.js';
import type { BlockMeans, BlockScorer } from '../index/method.js';

/** The scorer's calls, the last one's arguments and answer kept (references: fresh arrays each step). */
export class RecordingScorer implements BlockScorer {
  last?: { q: Float32Array; group: number; k: number; extra: Int32Array[]; reps?: number; answer: HeadTopBlocks[] | undefined };
  constructor(private readonly inner: BlockScorer) {}
  async topBlocks(heads: readonly BlockMeans[], q: Float32Array, group: number, k: number, extra: Int32Array[], reps?: number): Promise<HeadTopBlocks[] | undefined> {
    const answer = await this.inner.topBlocks(heads, q, group, k, extra, reps);
    this.last = { q, group, k, extra, reps, answer };
    return answer;
  }
}

/** Hands back a recorded answer (copied, as the wrapper's outputs are fresh) when the same extra rows are asked; its own time in `ms`. */
export class ReplayScorer implements BlockScorer {
  answer?: RecordingScorer['last'];
  ms = 0;
  async topBlocks(_heads: readonly BlockMeans[], _q: Float32Array, _group: number, _k: number, extra: Int32Array[]): Promise<HeadTopBlocks[] | undefined> {
    const t = performance.now(), r = this.answer;
    if (!r?.answer) throw new Error('no recorded answer to replay');
    if (extra.some((e, h) => e.length !== r.extra[h].length || e.some((x, i) => x !== r.extra[h][i]))) throw new Error('the replayed select asked other extra rows than the recorded call');
    const out = r.answer.map((x) => ({ ids: x.ids.slice(), scores: x.scores.slice(), extraScores: x.extraScores.slice() }));
    this.ms += performance.now() - t;
    return out;
  }
}
