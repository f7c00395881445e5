// Connected TCP pairs on 127.0.0.1 for tests that read a socket natively
// (addon/socket-read.ts), destroyed after each test.
import { once } from 'node:events';
import { connect, createServer, type Socket } from 'node:net';
import { afterEach } from 'vitest';

/**
 * Registers an afterEach that destroys the pairs a test made; returns the
 * maker: `server` is the accepted side (read there), `client` writes.
 */
export function useSocketPairs(): () => Promise<{ server: Socket; client: Socket }> {
  let cleanup: (() => void)[] = [];
  afterEach(() => {
    for (const f of cleanup) f();
    cleanup = [];
  });
  return async () => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1');
    await once(srv, 'listening');
    const { port } = srv.address() as { port: number };
    const accepted = once(srv, 'connection');
    const client = connect(port, '127.0.0.1');
    const [server] = (await accepted) as [Socket];
    cleanup.push(() => (client.destroy(), server.destroy(), srv.close()));
    return { server, client };
  };
}

/** Node's next 'data' chunks until `n` bytes have come. */
export async function nodeReads(socket: Socket, n: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let got = 0;
  while (got < n) {
    const [chunk] = (await once(socket, 'data')) as [Buffer];
    parts.push(chunk);
    got += chunk.byteLength;
  }
  return Buffer.concat(parts);
}
