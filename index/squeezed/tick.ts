// Builds run on the sidecar's one JavaScript thread, for seconds on long
// documents; their long loops await this now and then so that decode
// requests and other sessions' searches are not held up behind them.
export const tick = () => new Promise<void>((r) => setImmediate(r));
