// Synchronous SIMD dot products for centroid scoring: a tiny hand-assembled
// WebAssembly module (128-bit SIMD, on by default in Node 20).
//
// HeadIndex.search is synchronous, so the native kernels (async, off the main
// thread) cannot score centroids inside it. Measured on the shared 2-core dev
// machine (other jobs running) at 32K centroids, d = 128, 4 query rows: this
// kernel (one thread) 2.3–6 ms, the best plain-JS loop (2 rows × 4 query
// rows per step) 10–20 ms, native topk over f16 centroids (2 threads,
// awaited) 8–17 ms with k = all scores sorted, 3–9 ms with k = 1024.
//
// A DotKernel owns one WebAssembly.Memory holding f32 rows; callers lay out
// their regions in it once (rows never move: the memory never grows after
// construction). Exports, all over rows of `stride` floats (a multiple of 4):
//   max1/max2/max4(rows, n, stride, q, out, acc): out[i] = max over the 1/2/4
//     query rows at q of q_r · row_i; with acc, out[i] = max(out[i], that).
//   dots4(rows, n, stride, q, out): out[4i + r] = q_r · row_i.
// Rows are processed in pairs: when n is odd the row after the last one is
// read and its result written, so callers keep one spare row and one spare
// output (of 4 floats for dots4) after every region.

const uleb = (n: number): number[] => {
  const o: number[] = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n) b |= 0x80;
    o.push(b);
  } while (n);
  return o;
};
const sleb = (n: number): number[] => {
  const o: number[] = [];
  for (;;) {
    const b = n & 0x7f;
    n >>= 7;
    if ((n === 0 && !(b & 0x40)) || (n === -1 && b & 0x40)) return o.push(b), o;
    o.push(b | 0x80);
  }
};
const name = (s: string) => [...uleb(s.length), ...Array.from(s, (ch) => ch.charCodeAt(0))];
const section = (id: number, body: number[]) => [id, ...uleb(body.length), ...body];

const I32 = 0x7f, F32 = 0x7d, V128 = 0x7b;
const get = (i: number) => [0x20, ...uleb(i)];
const set = (i: number) => [0x21, ...uleb(i)];
const tee = (i: number) => [0x22, ...uleb(i)];
const i32 = (v: number) => [0x41, ...sleb(v)];
const simd = (op: number, ...imm: number[]) => [0xfd, ...uleb(op), ...imm];
const V_LOAD = simd(0x00, 4, 0);
const V_ZERO = simd(0x0c, ...new Array<number>(16).fill(0));
const F4_ADD = simd(0xe4), F4_MUL = simd(0xe6);
const lane = (l: number) => simd(0x1f, l);
const ADD = 0x6a, SHL = 0x74, GE_U = 0x4f, F_ADD = 0x92, F_MAX = 0x97;
const F_LOAD = (off: number) => [0x2a, 2, ...uleb(off)];
const F_STORE = (off: number) => [0x38, 2, ...uleb(off)];
const BLOCK = [0x02, 0x40], LOOP = [0x03, 0x40], END = 0x0b, IF = [0x04, 0x40];
const br = (depth: number) => [0x0c, depth];
const brIf = (depth: number) => [0x0d, depth];

// Locals: params 0 rows, 1 n, 2 stride, 3 q, 4 out, 5 acc; i32 6 i, 7 j (bytes), 8 rowBytes,
// 9..11 q rows 1..3, 12 second row of the pair; f32 13, 14; v128 from 15.
function body(rows: 1 | 2 | 4, mode: 'max' | 'dots'): number[] {
  const A = 15, B = A + rows, X = B + rows, Y = X + 1, QV = Y + 1;
  const qPtr = [3, 9, 10, 11];
  const hsum = (v: number) => [...get(v), ...lane(0), ...get(v), ...lane(1), F_ADD, ...get(v), ...lane(2), F_ADD, ...get(v), ...lane(3), F_ADD];
  const maxOf = (base: number) => {
    const o = hsum(base);
    for (let r = 1; r < rows; r++) o.push(...hsum(base + r), F_MAX);
    return o;
  };
  const b: number[] = [];
  const P = (...xs: (number | number[])[]) => {
    for (const x of xs) typeof x === 'number' ? b.push(x) : b.push(...x);
  };
  P(get(2), i32(2), SHL, set(8));
  P(get(3), get(8), ADD, tee(9), get(8), ADD, tee(10), get(8), ADD, set(11));
  P(i32(0), set(6));
  P(BLOCK, LOOP, get(6), get(1), GE_U, brIf(1));
  for (let a = A; a < X; a++) P(V_ZERO, set(a));
  P(get(0), get(8), ADD, set(12), i32(0), set(7));
  P(BLOCK, LOOP, get(7), get(8), GE_U, brIf(1));
  P(get(0), get(7), ADD, V_LOAD, set(X), get(12), get(7), ADD, V_LOAD, set(Y));
  for (let r = 0; r < rows; r++) {
    P(get(qPtr[r]), get(7), ADD, V_LOAD, set(QV));
    P(get(A + r), get(X), get(QV), F4_MUL, F4_ADD, set(A + r));
    P(get(B + r), get(Y), get(QV), F4_MUL, F4_ADD, set(B + r));
  }
  P(get(7), i32(16), ADD, set(7), br(0), END, END);
  if (mode === 'max') {
    P(maxOf(A), set(13), maxOf(B), set(14));
    P(get(5), IF, get(13), get(4), F_LOAD(0), F_MAX, set(13), get(14), get(4), F_LOAD(4), F_MAX, set(14), END);
    P(get(4), get(13), F_STORE(0), get(4), get(14), F_STORE(4), get(4), i32(8), ADD, set(4));
  } else {
    for (let r = 0; r < 8; r++) P(get(4), hsum(r < 4 ? A + r : B + r - 4), F_STORE(4 * r));
    P(get(4), i32(32), ADD, set(4));
  }
  P(get(0), get(8), ADD, get(8), ADD, set(0), get(6), i32(2), ADD, set(6), br(0), END, END, END);
  const locals = [[7, I32], [2, F32], [2 * rows + 3, V128]].flatMap(([n, t]) => [...uleb(n), t]);
  const full = [...uleb(3), ...locals, ...b];
  return [...uleb(full.length), ...full];
}

function moduleBytes(): Uint8Array<ArrayBuffer> {
  const sig = [0x60, 6, I32, I32, I32, I32, I32, I32, 0];
  const fns: [string, number[]][] = [
    ['max1', body(1, 'max')],
    ['max2', body(2, 'max')],
    ['max4', body(4, 'max')],
    ['dots4', body(4, 'dots')],
  ];
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 1, 0, 0, 0,
    ...section(1, [1, ...sig]),
    ...section(2, [1, ...name('e'), ...name('m'), 2, 0, 1]),
    ...section(3, [fns.length, ...fns.map(() => 0)]),
    ...section(7, [fns.length, ...fns.flatMap(([n], i) => [...name(n), 0, i])]),
    ...section(10, [fns.length, ...fns.flatMap(([, f]) => f)]),
  ]);
}

type Fn6 = (rows: number, n: number, stride: number, q: number, out: number, acc: number) => void;
interface Exports {
  max1: Fn6;
  max2: Fn6;
  max4: Fn6;
  dots4: Fn6;
}

let compiled: WebAssembly.Module | undefined;

/** Rows padded to a multiple of 4 floats. */
export const paddedStride = (d: number) => (d + 3) & ~3;

export class DotKernel {
  readonly f32: Float32Array;
  private readonly fn: Exports;

  /** `floats`: the f32 slots the caller's regions need (float offsets are byte offsets / 4). */
  constructor(floats: number) {
    compiled ??= new WebAssembly.Module(moduleBytes());
    const memory = new WebAssembly.Memory({ initial: Math.max(1, Math.ceil((floats * 4) / 65536)) });
    this.fn = new WebAssembly.Instance(compiled, { e: { m: memory } }).exports as unknown as Exports;
    this.f32 = new Float32Array(memory.buffer);
  }

  /**
   * out[i] = max over the query rows (qRows of them at float offset q, `stride` apart) of
   * q_r · row_i, for rows [0, n) at float offset `rows`; with acc, max-combined with out.
   * Query rows are taken 4 at a time; a tail of 3 repeats its first row (max unchanged).
   */
  maxDots(rows: number, n: number, stride: number, q: number, qRows: number, out: number, acc = false): void {
    if (n <= 0) return;
    for (let r0 = 0; r0 < qRows; r0 += 4) {
      const left = qRows - r0, a = acc || r0 > 0 ? 1 : 0, qp = (q + r0 * stride) * 4;
      if (left >= 4) this.fn.max4(rows * 4, n, stride, qp, out * 4, a);
      else if (left === 2) this.fn.max2(rows * 4, n, stride, qp, out * 4, a);
      else if (left === 1) this.fn.max1(rows * 4, n, stride, qp, out * 4, a);
      else {
        this.f32.copyWithin(q + (r0 + 3) * stride, q + r0 * stride, q + (r0 + 1) * stride);
        this.fn.max4(rows * 4, n, stride, qp, out * 4, a);
      }
    }
  }

  /** out[4i + r] = q_r · row_i for the 4 query rows at float offset q. */
  dots4(rows: number, n: number, stride: number, q: number, out: number): void {
    if (n > 0) this.fn.dots4(rows * 4, n, stride, q * 4, out * 4, 0);
  }
}
