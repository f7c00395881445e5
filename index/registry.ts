// The retrieval methods a session may name.
import { exact } from './exact.js';
import type { RetrievalMethod } from './method.js';

const METHODS: ReadonlyMap<string, RetrievalMethod> = new Map([[exact.name, exact]]);

export const methodNames: ReadonlySet<string> = new Set(METHODS.keys());

export function findMethod(name: string): RetrievalMethod | undefined {
  return METHODS.get(name);
}
