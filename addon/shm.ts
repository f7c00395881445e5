// A decode stream's shared-memory segment, mapped (native/bindings/shm_binding.cc
// says how it is opened and when it is unmapped: by unmapShared, or when the
// garbage collector drops the last view of it).
import { nativeAddon } from './addon.js';

const addon = nativeAddon<{
  shmMap(args: { path: string; bytes: number }): ArrayBuffer | number;
  shmUnmap(buf: ArrayBuffer): boolean;
  shmMapped(): SharedMapped;
}>();

/** The process's live shared-memory mappings. */
export interface SharedMapped {
  mappings: number;
  bytes: number;
}

/** Why a file could not be mapped (the native status, named). */
export type ShmProblem = 'not_found' | 'symlink' | 'not_regular' | 'too_small' | 'not_owner' | 'no_access' | 'map_failed' | 'open_failed';

const PROBLEMS: Record<number, ShmProblem> = {
  1: 'not_found',
  2: 'symlink',
  3: 'not_regular',
  4: 'too_small',
  5: 'not_owner',
  6: 'no_access',
  7: 'map_failed',
  8: 'open_failed',
};

/** The most bytes a segment may map. */
export const SHM_MAX_BYTES = 16 * 2 ** 30;

/**
 * Maps the first `bytes` of the file at `path` (a positive multiple of 4,
 * at most SHM_MAX_BYTES: checked by the caller, and again natively, which
 * throws) shared, read and write: the buffer, or why not.
 */
export function mapShared(path: string, bytes: number): ArrayBuffer | ShmProblem {
  const r = addon.shmMap({ path, bytes });
  return typeof r === 'number' ? (PROBLEMS[r] ?? 'open_failed') : r;
}

/**
 * Detaches `buf` (a mapShared buffer: every view of it reads as empty from
 * now on) and unmaps it now, not when the collector drops it; false when it
 * is not mapped (any more). No native work may be reading it.
 */
export function unmapShared(buf: ArrayBuffer): boolean {
  return addon.shmUnmap(buf);
}

/** What mapShared has mapped and is not unmapped yet, in this process. */
export function sharedMapped(): SharedMapped {
  return addon.shmMapped();
}
