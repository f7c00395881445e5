// A bench's client end of a plain TCP round trip (bench/transport-floor.ts,
// bench/transport-dim.ts): the floor under a kvrecall call, with no
// WebSocket, msgpack or server code in it.
import { connect, type Socket } from 'node:net';

/**
 * Connects to a bench peer on 127.0.0.1:port that answers every `req` bytes
 * with `res` bytes. `preamble`: written once first (a peer told its sizes
 * that way). call() writes one request and resolves when its whole answer
 * is in; `spinMs`: after each request the loop polls that long for the
 * answer (a setImmediate a turn) before it sleeps, as openStream's spinMs.
 */
export async function tcpLink(port: number, req: number, res: number, opts: { preamble?: Buffer; spinMs?: number } = {}): Promise<{ call(): Promise<void>; close(): void }> {
  const s: Socket = connect(port, '127.0.0.1');
  s.setNoDelay(true);
  await new Promise((r) => s.once('connect', r));
  if (opts.preamble) s.write(opts.preamble);
  let got = 0, waiting: (() => void) | undefined;
  s.on('data', (d: Buffer) => {
    got += d.byteLength;
    if (got < res) return;
    got -= res;
    const w = waiting;
    waiting = undefined;
    w?.();
  });
  const body = Buffer.alloc(req, 2);
  const spinMs = opts.spinMs ?? 0;
  return {
    call: () =>
      new Promise<void>((r) => {
        waiting = r;
        s.write(body);
        if (spinMs > 0) {
          const until = performance.now() + spinMs;
          const turn = () => {
            if (waiting && performance.now() < until) setImmediate(turn);
          };
          setImmediate(turn);
        }
      }),
    close: () => s.destroy(),
  };
}
