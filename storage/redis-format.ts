// How documents lie on a Redis Cluster: key names (hash tags choose the
// slots) and the checksummed values of blocks and artifacts. Used by the
// store's worker thread, and by tests that reach into the cluster.
//
//   kvr:{index}                       set of document ids
//   kvr:{d/ID}                        hash: status, meta (JSON), methods, gen,
//                                     owner, x<layer> (blocks written)
//   kvr:{d/ID}:lease                  the loading server's lease (TTL)
//   kvr:{d/ID}:call/TOKEN             a create's, seal's or remove's answer,
//                                     kept a while for its retries (TTL)
//   kvr:{b/ID/GEN/L/G}H/B             block B of kv head H, layer L, in group
//                                     G = ⌊B / GROUP_BLOCKS⌋: 24-byte header
//                                     (magic, tokens, checksum64 of K and of
//                                     V), then K, then V
//   kvr:{a/ID/GEN/METHOD/L}H          artifact: 16-byte header, then bytes
//
// A document's metadata and status are one key; its lease shares that key's
// slot (one Lua script reads both). Blocks are tagged per group of blocks,
// not per layer, so a layer's groups land on every master and an attach
// reads all shards at once, one MGET per group. GEN is drawn at each PUT, so
// blocks of an earlier incarnation of the id are never read as this one's.
import { checksum64 } from '../addon/kernels.js';

/** Blocks per (layer, group) and kv head sharing one hash tag. */
export const GROUP_BLOCKS = 16;

export const INDEX_KEY = 'kvr:{index}';
export const metaKey = (id: string) => `kvr:{d/${id}}`;
export const leaseKey = (id: string) => `kvr:{d/${id}}:lease`;
export const receiptKey = (id: string, token: string) => `kvr:{d/${id}}:call/${token}`;
export const blockKey = (id: string, gen: string, layer: number, head: number, block: number) =>
  `kvr:{b/${id}/${gen}/${layer}/${Math.floor(block / GROUP_BLOCKS)}}${head}/${block}`;
export const artifactKey = (id: string, gen: string, method: string, layer: number, head: number) => `kvr:{a/${id}/${gen}/${method}/${layer}}${head}`;

export const BLOCK_HEADER = 24;
export const ARTIFACT_HEADER = 16;
const BLOCK_MAGIC = 0x3142564b; // "KVB1"
const ARTIFACT_MAGIC = 0x3141564b; // "KVA1"
const ALL_ONES = (1n << 64n) - 1n;

/** The key's own checksum, folded into its value's: a value moved to another key does not verify. */
function keySum(key: string): bigint {
  return checksum64(Buffer.from(key, 'latin1'));
}

/** A block's 24-byte header: magic, tokens, and the checksums of K and V (each folded with the key's). */
export function blockHeader(key: string, k: Uint8Array, v: Uint8Array, n: number): Buffer {
  const out = Buffer.allocUnsafe(BLOCK_HEADER);
  const kh = keySum(key);
  out.writeUInt32LE(BLOCK_MAGIC, 0);
  out.writeUInt32LE(n, 4);
  out.writeBigUInt64LE(checksum64(k) ^ kh, 8);
  out.writeBigUInt64LE(checksum64(v) ^ kh ^ ALL_ONES, 16);
  return out;
}

/**
 * A stored block's K and V after checking its header and checksums against
 * the tokens expected; a string says what is wrong.
 */
export function openBlock(key: string, value: Uint8Array, n: number, rowBytes: number): { k: Uint8Array; v: Uint8Array } | string {
  if (value.byteLength !== BLOCK_HEADER + 2 * n * rowBytes) return `holds ${value.byteLength} bytes, not ${BLOCK_HEADER + 2 * n * rowBytes}`;
  const k = value.subarray(BLOCK_HEADER, BLOCK_HEADER + n * rowBytes);
  const v = value.subarray(BLOCK_HEADER + n * rowBytes);
  const wrong = checkBlock(key, value.subarray(0, BLOCK_HEADER), k, v, n);
  return wrong ?? { k, v };
}

/** Checks a block read apart — its header, and its K and V where they landed — against its checksums; a string says what is wrong. */
export function checkBlock(key: string, header: Uint8Array, k: Uint8Array, v: Uint8Array, n: number): string | undefined {
  const dv = new DataView(header.buffer, header.byteOffset, BLOCK_HEADER);
  if (dv.getUint32(0, true) !== BLOCK_MAGIC) return 'has no block header';
  if (dv.getUint32(4, true) !== n) return `holds ${dv.getUint32(4, true)} tokens, not ${n}`;
  const kh = keySum(key);
  if ((checksum64(k) ^ kh) !== dv.getBigUint64(8, true)) return 'fails its K checksum';
  if ((checksum64(v) ^ kh ^ ALL_ONES) !== dv.getBigUint64(16, true)) return 'fails its V checksum';
  return undefined;
}

/** An artifact's stored value: header then bytes. */
export function artifactValue(key: string, bytes: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(ARTIFACT_HEADER + bytes.byteLength);
  out.writeUInt32LE(ARTIFACT_MAGIC, 0);
  out.writeUInt32LE(0, 4);
  out.writeBigUInt64LE(checksum64(bytes) ^ keySum(key), 8);
  out.set(bytes, ARTIFACT_HEADER);
  return out;
}

/** A stored artifact's bytes after checking its checksum; a string says what is wrong. */
export function openArtifact(key: string, value: Uint8Array): Uint8Array | string {
  if (value.byteLength < ARTIFACT_HEADER) return 'is shorter than its header';
  const dv = new DataView(value.buffer, value.byteOffset, ARTIFACT_HEADER);
  if (dv.getUint32(0, true) !== ARTIFACT_MAGIC) return 'has no artifact header';
  const bytes = value.subarray(ARTIFACT_HEADER);
  if ((checksum64(bytes) ^ keySum(key)) !== dv.getBigUint64(8, true)) return 'fails its checksum';
  return bytes;
}

/**
 * A block write handed to the worker: its K and V either read in place
 * (views of a shared segment) or copied into a staging buffer at `at` (K
 * then V).
 */
export interface StagedBlock {
  layer: number;
  head: number;
  block: number;
  /** Tokens in the block. */
  n: number;
  k?: Uint8Array;
  v?: Uint8Array;
  at?: number;
}

/** An artifact in a staging buffer. */
export interface StagedArtifact {
  method: string;
  layer: number;
  head: number;
  at: number;
  bytes: number;
}

/** `redis://h:p[,h:p...][?lease=MS&failover=MS&wait=MS]` → seeds and options. */
export interface RedisLocation {
  seeds: { host: string; port: number }[];
  /** TTL of a loading document's lease; a loader silent this long leaves it incomplete. */
  leaseMs: number;
  /** How long a read or write keeps retrying through a failover before answering 503. */
  failoverMs: number;
  /** How long seal waits for replicas to acknowledge (WAIT). */
  waitMs: number;
}

export function parseRedisLocation(url: string): RedisLocation {
  const m = /^redis:\/\/([^?]+)(?:\?(.*))?$/.exec(url);
  if (!m) throw new Error(`a Redis store is redis://HOST:PORT[,HOST:PORT...], not ${url}`);
  const seeds = m[1].split(',').map((s) => {
    const hp = /^([^:]+):(\d+)$/.exec(s.trim());
    if (!hp || Number(hp[2]) < 1 || Number(hp[2]) > 65535) throw new Error(`bad Redis seed ${s} in ${url} (HOST:PORT)`);
    return { host: hp[1], port: Number(hp[2]) };
  });
  const loc: RedisLocation = { seeds, leaseMs: 5000, failoverMs: 20000, waitMs: 10000 };
  for (const [k, v] of new URLSearchParams(m[2] ?? '')) {
    const n = Number(v);
    const key = { lease: 'leaseMs', failover: 'failoverMs', wait: 'waitMs' }[k] as 'leaseMs' | 'failoverMs' | 'waitMs' | undefined;
    if (!key || !Number.isInteger(n) || n < 100) throw new Error(`unknown or bad option ${k}=${v} in ${url} (lease, failover, wait: milliseconds ≥ 100)`);
    loc[key] = n;
  }
  return loc;
}

// CRC16-CCITT (XMODEM), as Redis Cluster maps keys to its 16384 slots.
const CRC_TABLE = Array.from({ length: 256 }, (_, i) => {
  let c = i << 8;
  for (let j = 0; j < 8; j++) c = c & 0x8000 ? ((c << 1) ^ 0x1021) & 0xffff : (c << 1) & 0xffff;
  return c;
});

/** The cluster slot of a key: of its hash tag (the first non-empty {…}) when it has one. */
export function keySlot(key: string): number {
  const open = key.indexOf('{');
  if (open >= 0) {
    const close = key.indexOf('}', open + 1);
    if (close > open + 1) key = key.slice(open + 1, close);
  }
  let crc = 0;
  for (let i = 0; i < key.length; i++) crc = ((crc << 8) & 0xffff) ^ CRC_TABLE[((crc >> 8) ^ key.charCodeAt(i)) & 0xff];
  return crc & 16383;
}
