// The machine line the CPU benches put in their results (bench/results/*.md
// and .json): the CPU, its cores, the native pool's threads and the memory.
import { cpus, totalmem } from 'node:os';
import { nativeThreads } from '../addon/kernels.js';

export function machine(): string {
  const cpu = cpus()[0]?.model.trim() ?? 'unknown CPU';
  return `${cpu}, ${cpus().length} cores (native pool ${nativeThreads} threads), ${(totalmem() / 2 ** 30).toFixed(1)} GiB`;
}
