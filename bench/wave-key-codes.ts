// Compressed keys for bench/wave-code-rescore.ts's emulation of a rescoring
// from codes the device holds for every key: ra_pq_codes.h's PQ layout
// (16 B a key at d = 128), per-channel scalar codes (ra_key_codes.h's at 4
// bits), and the rows with a channel far out (ra_pq_codes.h's outliers). JS
// stand-ins of the native codes' layouts, scored through per-query byte
// tables as the native scans score theirs; not the native k-means bit for bit.
import { bytesOf, convert, type KvDtype } from '../addon/kernels.js';

const DT: KvDtype = 'f16';

/** A head's keys as codes the device would hold for every key, scored through per-query byte tables. */
export interface KeyCode {
  bytes: number;
  codes: Uint8Array;
  /** [G, bytes, 256]: a row's approximate logit for q row g is Σ_b T[g, b, code byte b]. */
  tables(q: Float32Array, G: number, d: number, scale: number): Float32Array;
}

/** Rows [from, from + n) of a head's storage words as f32. */
export function rowsF32(keys: Uint16Array, d: number, from: number, n: number): Float32Array {
  const out = new Float32Array(n * d);
  convert(bytesOf(keys.subarray(from * d, (from + n) * d)), DT, bytesOf(out), 'f32', n * d);
  return out;
}

/** Per channel mean and standard deviation over every key (float64 sums). */
function channelStats(keys: Uint16Array, N: number, d: number): { mu: Float64Array; sd: Float64Array } {
  const s1 = new Float64Array(d), s2 = new Float64Array(d);
  for (let t0 = 0; t0 < N; t0 += 65536) {
    const n = Math.min(65536, N - t0), K = rowsF32(keys, d, t0, n);
    for (let i = 0; i < n * d; i++) {
      const x = K[i];
      s1[i % d] += x;
      s2[i % d] += x * x;
    }
  }
  const mu = s1.map((s) => s / N), sd = s2.map((s, j) => Math.sqrt(Math.max(1e-20, s / N - mu[j] * mu[j])));
  return { mu, sd };
}

/** Rows with a channel more than `sigmas` standard deviations out (ra_pq_codes.h's outliers). */
export function outlierRows(keys: Uint16Array, N: number, d: number, sigmas: number): Uint8Array {
  const { mu, sd } = channelStats(keys, N, d), out = new Uint8Array(N);
  for (let t0 = 0; t0 < N; t0 += 65536) {
    const n = Math.min(65536, N - t0), K = rowsF32(keys, d, t0, n);
    for (let r = 0; r < n; r++)
      for (let j = 0; j < d; j++)
        if (Math.abs(K[r * d + j] - mu[j]) > sigmas * sd[j]) {
          out[t0 + r] = 1;
          break;
        }
  }
  return out;
}

/**
 * ra_pq_codes.h's layout: subspaces of 4 channels, 16 centroids each
 * (k-means, 20 rounds over <= 32768 strided keys), two subspaces a byte.
 */
export function pqCode(keys: Uint16Array, N: number, d: number): KeyCode {
  const M = d / 4, S = Math.min(N, 32768), stride = N / S;
  const sample = new Float32Array(S * d);
  for (let i = 0; i < S; i++) sample.set(rowsF32(keys, d, Math.floor(i * stride), 1), i * d);
  const cent = new Float32Array(M * 16 * 4);
  const assign = new Int32Array(S), sum = new Float64Array(16 * 4), cnt = new Int32Array(16);
  for (let s = 0; s < M; s++) {
    const c = cent.subarray(s * 64, (s + 1) * 64);
    for (let k = 0; k < 16; k++) for (let j = 0; j < 4; j++) c[k * 4 + j] = sample[Math.floor(((k + 0.5) * S) / 16) * d + 4 * s + j];
    for (let it = 0; it < 20; it++) {
      sum.fill(0);
      cnt.fill(0);
      for (let i = 0; i < S; i++) {
        const o = i * d + 4 * s;
        let best = 0, bd = Infinity;
        for (let k = 0; k < 16; k++) {
          const a = sample[o] - c[k * 4], b = sample[o + 1] - c[k * 4 + 1], e = sample[o + 2] - c[k * 4 + 2], f = sample[o + 3] - c[k * 4 + 3];
          const dd = a * a + b * b + e * e + f * f;
          if (dd < bd) (bd = dd), (best = k);
        }
        assign[i] = best;
        cnt[best]++;
        for (let j = 0; j < 4; j++) sum[best * 4 + j] += sample[o + j];
      }
      for (let k = 0; k < 16; k++) if (cnt[k] > 0) for (let j = 0; j < 4; j++) c[k * 4 + j] = sum[k * 4 + j] / cnt[k];
    }
  }
  const B = M / 2, codes = new Uint8Array(N * B);
  for (let t0 = 0; t0 < N; t0 += 65536) {
    const n = Math.min(65536, N - t0), K = rowsF32(keys, d, t0, n);
    for (let r = 0; r < n; r++)
      for (let s = 0; s < M; s++) {
        const o = r * d + 4 * s, c = s * 64;
        let best = 0, bd = Infinity;
        for (let k = 0; k < 16; k++) {
          const a = K[o] - cent[c + k * 4], b = K[o + 1] - cent[c + k * 4 + 1], e = K[o + 2] - cent[c + k * 4 + 2], f = K[o + 3] - cent[c + k * 4 + 3];
          const dd = a * a + b * b + e * e + f * f;
          if (dd < bd) (bd = dd), (best = k);
        }
        codes[(t0 + r) * B + (s >> 1)] |= s & 1 ? best << 4 : best;
      }
  }
  return {
    bytes: B,
    codes,
    tables(q, G, dd, scale) {
      const T = new Float32Array(G * B * 256), part = new Float32Array(16);
      for (let g = 0; g < G; g++)
        for (let s = 0; s < M; s++) {
          for (let k = 0; k < 16; k++) {
            let x = 0;
            for (let j = 0; j < 4; j++) x += q[g * dd + 4 * s + j] * cent[s * 64 + k * 4 + j];
            part[k] = scale * x;
          }
          const base = (g * B + (s >> 1)) * 256;
          for (let byte = 0; byte < 256; byte++) T[base + byte] += part[s & 1 ? byte >> 4 : byte & 15];
        }
      return T;
    },
  };
}

/** Per-channel scalar codes of `bits` bits, levels spread uniformly over mean ± sigmas·σ (ra_key_codes.h at 4 bits, 3σ). */
export function scalarCode(keys: Uint16Array, N: number, d: number, bits: number, sigmas: number): KeyCode {
  const { mu, sd } = channelStats(keys, N, d), L = 1 << bits, per = 8 / bits, B = (d * bits) / 8;
  const low = mu.map((m, j) => m - sigmas * sd[j]), step = sd.map((s) => (2 * sigmas * s) / L);
  const codes = new Uint8Array(N * B);
  for (let t0 = 0; t0 < N; t0 += 65536) {
    const n = Math.min(65536, N - t0), K = rowsF32(keys, d, t0, n);
    for (let r = 0; r < n; r++)
      for (let j = 0; j < d; j++) {
        const c = Math.min(L - 1, Math.max(0, Math.floor((K[r * d + j] - low[j]) / step[j])));
        codes[(t0 + r) * B + Math.floor(j / per)] |= c << ((j % per) * bits);
      }
  }
  return {
    bytes: B,
    codes,
    tables(q, G, dd, scale) {
      const T = new Float32Array(G * B * 256);
      for (let g = 0; g < G; g++)
        for (let b = 0; b < B; b++)
          for (let byte = 0; byte < 256; byte++) {
            let x = 0;
            for (let m = 0; m < per; m++) {
              const j = b * per + m, c = (byte >> (m * bits)) & (L - 1);
              x += q[g * dd + j] * (low[j] + (c + 0.5) * step[j]);
            }
            T[(g * B + b) * 256 + byte] = scale * x;
          }
      return T;
    },
  };
}
