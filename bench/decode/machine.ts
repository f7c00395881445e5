// The machine and the server's memory, recorded next to every result (a
// shared machine or a swapping server slows every number).
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { cpus, loadavg, totalmem } from 'node:os';
import { join, sep } from 'node:path';
import { nativeThreads } from '../../addon/kernels.js';
import { GiB, round } from './util.js';

export interface Machine {
  cpu: string;
  cores: number;
  memoryGiB: number;
  node: string;
  platform: string;
  nativeThreads: number;
  /** 1-minute load average at the start (a shared machine slows every number). */
  loadAverage: number;
}

export function machine(): Machine {
  let cpu = cpus()[0]?.model?.trim() || 'unknown CPU';
  try {
    const line = readFileSync('/proc/cpuinfo', 'utf8').split('\n').find((l) => l.startsWith('model name'));
    if (line) cpu = line.split(':')[1].trim();
  } catch {
    /* not Linux */
  }
  return {
    cpu,
    cores: cpus().length,
    memoryGiB: round(totalmem() / GiB, 1),
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
    nativeThreads,
    loadAverage: round(loadavg()[0], 2),
  };
}

function procRss(pid: number): { rss?: number; peak?: number } {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => {
      const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status);
      return m ? Number(m[1]) * 1024 : undefined;
    };
    return { rss: kb('VmRSS'), peak: kb('VmHWM') };
  } catch {
    return {};
  }
}

export interface ServerMemory {
  rssBytes?: number;
  peakRssBytes?: number;
  rssNote: string;
  dataMdbBytes?: number;
  dataMdbAllocatedBytes?: number;
}

/**
 * The server's RSS (in process: this process; else from /proc with
 * --server-pid) and the size of every data.mdb under its data folder, when
 * the folder is known.
 */
export function serverMemory(inProcess: boolean, serverPid: number | undefined, dataDir: string | undefined): ServerMemory {
  let rssBytes: number | undefined, peakRssBytes: number | undefined, rssNote: string;
  if (inProcess) {
    rssBytes = process.memoryUsage().rss;
    peakRssBytes = process.resourceUsage().maxRSS * 1024;
    rssNote = 'in-process: server + benchmark (it holds the sampled heads and one step of queries)';
  } else if (serverPid) {
    const r = procRss(serverPid);
    rssBytes = r.rss;
    peakRssBytes = r.peak;
    rssNote = `server pid ${serverPid}`;
  } else rssNote = 'n/a (--url without --server-pid)';
  let dataMdbBytes: number | undefined, dataMdbAllocatedBytes: number | undefined;
  // Every LMDB environment under the data folder: each document has its own (blocks shards, artifacts) beside the catalogue's.
  if (dataDir)
    try {
      for (const f of readdirSync(dataDir, { recursive: true, encoding: 'utf8' })) {
        if (f !== 'data.mdb' && !f.endsWith(`${sep}data.mdb`)) continue;
        const st = statSync(join(dataDir, f));
        dataMdbBytes = (dataMdbBytes ?? 0) + st.size;
        dataMdbAllocatedBytes = (dataMdbAllocatedBytes ?? 0) + st.blocks * 512;
      }
    } catch {
      /* no data folder */
    }
  return { rssBytes, peakRssBytes, rssNote, dataMdbBytes, dataMdbAllocatedBytes };
}

/** The GPU pool as /v1/health reports it, or why there is none. */
export function gpuPool(h: Record<string, unknown>): string {
  if (h.backend !== 'cuda') return `n/a (${String(h.backend ?? 'unknown')} backend)`;
  const gpu = h.gpu as { pool?: unknown } | undefined;
  const pool = gpu?.pool ?? gpu;
  return pool === undefined ? 'cuda (pool size not reported by /v1/health)' : JSON.stringify(pool);
}
