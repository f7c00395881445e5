// The engine: the document store, the documents and the sessions, wired
// together once at start.
import { mkdirSync } from 'node:fs';
import { methodNames } from '../index/registry.js';
import { HostBudget } from '../storage/host-budget.js';
import { DocumentStore } from '../storage/store.js';
import { Documents } from './documents.js';
import { Sessions } from './sessions.js';

export interface EngineOptions {
  dataDir: string;
  /** Host bytes the KV of documents and sessions may hold. */
  memoryBudget: number;
}

export class Engine {
  private constructor(
    readonly store: DocumentStore,
    readonly documents: Documents,
    readonly sessions: Sessions,
    /** Documents found mid-preload at start (a crash) and marked incomplete. */
    readonly recovered: string[],
    readonly budget: HostBudget,
  ) {}

  static async open(opts: EngineOptions): Promise<Engine> {
    mkdirSync(opts.dataDir, { recursive: true });
    const { store, recovered } = await DocumentStore.open(opts.dataDir);
    const budget = new HostBudget(opts.memoryBudget);
    const documents = new Documents(store, methodNames, budget);
    return new Engine(store, documents, new Sessions(documents, budget), recovered, budget);
  }

  async close(): Promise<void> {
    await this.store.close();
  }
}
