// An attend's answer on the wire, the same for the single route, the batch
// route and the stream: out and lse as f32 tensors, optional selection and
// kv, the step's stats. Tensors are views of the result's arrays (no copy).
import { tensorOf } from '../core/tensor.js';
import type { AttendAnswer } from '../engine/sessions.js';

export function attendAnswer(res: AttendAnswer): Record<string, unknown> {
  const m = res.model;
  return {
    out: tensorOf('f32', [m.qHeads, m.headDim], res.out),
    lse: tensorOf('f32', [m.qHeads], res.lse),
    ...(res.selection && { selection: res.selection.map((ids) => tensorOf('i32', [ids.length], ids)) }),
    ...(res.kv && {
      kv: {
        k: res.kv.k.map((a) => tensorOf(m.dtype, [a.length / m.headDim, m.headDim], a)),
        v: res.kv.v.map((a) => tensorOf(m.dtype, [a.length / m.headDim, m.headDim], a)),
      },
    }),
    stats: res.stats,
  };
}

/** One batch step's answer: the attend's, or its error. */
export function batchAnswer(r: PromiseSettledResult<AttendAnswer>, errorOf: (e: unknown) => { code: string; message: string }): Record<string, unknown> {
  if (r.status === 'fulfilled') return attendAnswer(r.value);
  const { code, message } = errorOf(r.reason);
  return { error: { code, message } };
}
