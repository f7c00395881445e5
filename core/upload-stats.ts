// The per-phase timing an upload's answer carries: part of the wire protocol,
// shared by the server and the clients.
/** Where the server's time on one document upload went (ms), and the body's size. */
export interface UploadStats {
  bytes: number;
  /** Body arrival (from the route's start) and msgpack decode, when the route measured them. */
  readMs: number;
  decodeMs: number;
  /** Waiting behind the document's earlier requests. */
  queueMs: number;
  /** Shapes and dtypes (the NaN/Inf scan counts in appendMs). */
  checkMs: number;
  /** NaN/Inf scan and copy into host memory (for a body in the storage dtype, one pass off the event loop), prefill queries kept. */
  appendMs: number;
  /** Waiting for the previous upload's blocks to commit, and staging this one's. */
  writeMs: number;
}
