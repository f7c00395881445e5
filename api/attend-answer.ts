// An attend's answer on the wire, the same for the single route, the batch
// route and the stream: out (f32, or the model's 16-bit dtype when the
// request asked) and lse (f32) tensors, optional selection and kv, the
// step's stats. Tensors are views of the result's arrays (no copy) but a
// 16-bit out, which is one rounding of the f32 result.
import { narrowWords } from '../addon/kernels.js';
import { tensorOf } from '../core/tensor.js';
import type { AttendAnswer } from '../engine/sessions.js';

type ErrorOf = (e: unknown) => { code: string; message: string };

export function attendAnswer(res: AttendAnswer): Record<string, unknown> {
  const m = res.model;
  return {
    out: outTensor(res),
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

/** The answer's out in its wire dtype (`outDtype`): f32, or its 16-bit words. */
export function wireOut(res: AttendAnswer): Float32Array | Uint16Array {
  if (res.outDtype === 'f32') return res.out;
  if (res.outWords) return res.outWords;
  // Rounded in the step (engine/sessions.ts); here only for a result made without it.
  return narrowWords(res.out, res.outDtype);
}

function outTensor(res: AttendAnswer): ReturnType<typeof tensorOf> {
  return tensorOf(res.outDtype, [res.model.qHeads, res.model.headDim], wireOut(res));
}

/** One batch step's answer: the attend's, or its error. */
export function batchAnswer(r: PromiseSettledResult<AttendAnswer>, errorOf: ErrorOf): Record<string, unknown> {
  if (r.status === 'fulfilled') return attendAnswer(r.value);
  const { code, message } = errorOf(r.reason);
  return { error: { code, message } };
}
