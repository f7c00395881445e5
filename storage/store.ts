// The store's records and the LMDB store under the name the code knew it by
// before there were two stores: the interface is `document-store.ts`, the
// stores are `lmdb-store.ts` and `redis-store.ts`.
export type { ArtifactWrite, BlockWrite, DocumentMeta, DocumentStatus } from './document-store.js';
export { LmdbStore as DocumentStore } from './lmdb-store.js';
