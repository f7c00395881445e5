// The opening handshake of GET /v1/stream's WebSocket (RFC 6455 §4.2):
// version 13, no extensions or subprotocols agreed, so frames carry none.
import { createHash } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

/** Why this upgrade request is not a WebSocket handshake we accept, or undefined when it is. */
export function handshakeProblem(req: IncomingMessage): string | undefined {
  if (req.method !== 'GET') return 'a WebSocket handshake is a GET';
  if (!/(^|,)\s*websocket\s*(,|$)/i.test(req.headers.upgrade ?? '')) return 'Upgrade must be websocket';
  if (req.headers['sec-websocket-version'] !== '13') return 'Sec-WebSocket-Version must be 13';
  const key = req.headers['sec-websocket-key'];
  if (typeof key !== 'string' || !/^[A-Za-z0-9+/]{22}==$/.test(key.trim())) return 'Sec-WebSocket-Key must be 16 bytes in base64';
  return undefined;
}

/** Completes the handshake of an accepted upgrade request on its socket. */
export function acceptHandshake(req: IncomingMessage, socket: Socket): void {
  const accept = createHash('sha1')
    .update((req.headers['sec-websocket-key'] as string).trim() + GUID)
    .digest('base64');
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
}
