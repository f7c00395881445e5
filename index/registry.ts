// The retrieval methods a session may name, and a document may index.
import { exact } from './exact.js';
import { hnsw } from './hnsw.js';
import { ivf } from './ivf.js';
import { infiniretri } from './infiniretri.js';
import { nosa, topkBlocks } from './block-select.js';
import { quest } from './quest.js';
import type { RetrievalMethod } from './method.js';
import { wave } from './wave/wave.js';
import { retrievalAttention } from './retrieval-attention.js';
import { squeezed, squeezed2l } from './squeezed/index.js';

const METHODS: ReadonlyMap<string, RetrievalMethod> = new Map([exact, hnsw, ivf, retrievalAttention, infiniretri, nosa, topkBlocks, quest, squeezed, squeezed2l, wave].map((m) => [m.name, m]));

export const methodNames: ReadonlySet<string> = new Set(METHODS.keys());

/** Methods that build a per-head index of each document. */
export const indexedMethodNames: ReadonlySet<string> = new Set([...METHODS.values()].filter((m) => m.builder).map((m) => m.name));

export function findMethod(name: string): RetrievalMethod | undefined {
  return METHODS.get(name);
}
