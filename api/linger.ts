// Lingering close (as Apache's and nginx's): when the server closes a
// connection after answering a request whose body it did not read (413
// over the limit, an error before the body), it half-closes instead of
// dropping it. Dropping it with the client's body still arriving makes the
// kernel answer that body with a reset, and a client still writing then
// sees EPIPE/ECONNRESET, often before it has read the answer it was sent
// (the TypeScript client reported `write EPIPE` for 2 of 36 oversized
// uploads). Half-closed, the answer and a FIN go out, the rest of the body
// is read and dropped for at most LINGER_MS or LINGER_BYTES, then the
// socket is destroyed.
import type { Server } from 'node:http';
import type { Socket } from 'node:net';

export const LINGER_MS = 1000;
export const LINGER_BYTES = 64 << 20;

/** Node's http server ends a connection it will not keep alive through socket.destroySoon(); this makes that a lingering close. */
export function lingerOnClose(server: Server): void {
  server.on('connection', (socket: Socket) => {
    socket.destroySoon = function (this: Socket) {
      if (this.destroyed) return;
      let read = 0;
      const timer = setTimeout(() => this.destroy(), LINGER_MS);
      timer.unref();
      this.once('close', () => clearTimeout(timer));
      this.on('data', (chunk: Buffer) => {
        read += chunk.byteLength;
        if (read > LINGER_BYTES) this.destroy();
      });
      // The peer's FIN: nothing more will come.
      this.once('end', () => this.destroy());
      this.end();
      this.resume();
    };
  });
}
