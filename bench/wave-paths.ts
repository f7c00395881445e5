// The wave step's kernel paths by name, as the switches the native step reads
// at each call (native/cuda/wave_paths.cuh): `plain` sums every score, dot
// and tile in the host's order (its ids are the CPU path's bit for bit),
// `score` runs ScoreClusters on the tensor cores, `tiles` the tiles'
// numerators, `rescore` the candidates' dots (RescoreHeld), `both` the first
// two, `all` (the default) all three. The checks that compare the device's ids with
// the host's bit for bit run under `plain`; the tensor-core paths are checked
// against float64 with tolerances (bench/wave-gpu-mma.ts).
const path = (score: 0 | 1, tiles: 0 | 1, rescore: 0 | 1) =>
  ({ KVRECALL_WAVE_MMA: `${score}`, KVRECALL_WAVE_MMA_TILES: `${tiles}`, KVRECALL_WAVE_MMA_RESCORE: `${rescore}` }) as const;
export const PATHS = {
  plain: path(0, 0, 0),
  score: path(1, 0, 0),
  tiles: path(0, 1, 0),
  rescore: path(0, 0, 1),
  both: path(1, 1, 0),
  all: path(1, 1, 1),
} as const satisfies Record<string, Record<string, string>>;
export type PathName = keyof typeof PATHS;
export const isPath = (x: string | undefined): x is PathName => x !== undefined && Object.hasOwn(PATHS, x);

/** A tensor-core path's ids against the host's, per head (Jaccard): a cluster or candidate at a cut may fall the other side of it. */
export const MIN_OVERLAP = 0.9;

/** Sets the path's switches in this process's environment; returns what puts the old values back. */
export function setPath(path: PathName): () => void {
  const names = Object.keys(PATHS[path]) as (keyof (typeof PATHS)[PathName])[];
  const before = names.map((k) => process.env[k]);
  Object.assign(process.env, PATHS[path]);
  return () =>
    names.forEach((k, i) => {
      const v = before[i];
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    });
}

/** Runs f with the path's switches set, then puts the old ones back. */
export async function withPath<T>(path: PathName, f: () => Promise<T>): Promise<T> {
  const restore = setPath(path);
  try {
    return await f();
  } finally {
    restore();
  }
}
