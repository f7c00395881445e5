// Where the device benches write: each result's JSON and markdown into
// bench/results and, on a device visit, into $OUT (bench/gpu-visit.sh and
// bench/device-ab.sh collect it from there), named by the card.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cudaAvailable, deviceName, type CudaInfo } from '../addon/cuda.js';

/** The card's short name for result files ('h100', 'h200'), 'gpu' for another. */
export const cardName = (device: string | undefined): string => /H\d00/.exec(device ?? '')?.[0].toLowerCase() ?? 'gpu';

/** Writes `name`.json (JSON.stringify of json, 2-space) and `name`.md into bench/results and $OUT where set. */
export function saveDeviceResult(name: string, json: unknown, md: string): void {
  for (const dir of ['bench/results', ...(process.env.OUT ? [process.env.OUT] : [])]) {
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, `${name}.json`), JSON.stringify(json, null, 2) + '\n');
    writeFileSync(join(dir, `${name}.md`), md);
  }
}

/** The device a device bench runs on, named on stdout; without one the process exits with code 2. */
export function requireDevice(): Extract<CudaInfo, { ok: true }> {
  const info = cudaAvailable();
  console.log(`device: ${deviceName(info)}`);
  if (!info.ok) process.exit(2);
  return info;
}
