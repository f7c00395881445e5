// Reads the rest of a large message straight from a socket's descriptor
// into its buffer, on a thread of the addon's own
// (native/bindings/socket_read_binding.cc says why).
import type { Socket } from 'node:net';
import { nativeAddon } from './addon.js';

interface Addon {
  readSocket(a: { fd: number; dst: Uint8Array; mask: Uint8Array; phase: number; cancel: Int32Array; progressMs: number; ahead?: Uint8Array }): Promise<number>;
}

const addon = nativeAddon<Addon>();

/** What node's net.Socket keeps of its libuv handle; read only here, where reading is handed over and back. */
interface StreamHandle {
  fd?: number;
  reading?: boolean;
  readStop?(): number;
  readStart?(): number;
}

/** A read in progress: settles with the bytes read, or rejects (peer gone, timeout, cancel). */
export interface SocketRead {
  /** dst.byteLength, plus the bytes read on into `ahead` (from its start), as they came: not unmasked. */
  done: Promise<number>;
  /** Asks the reading thread to stop (it notices within ~50 ms); `done` then rejects. */
  cancel(): void;
}

function handleOf(socket: Socket): StreamHandle | undefined {
  const h = (socket as unknown as { _handle?: StreamHandle | null })._handle;
  return h && typeof h.fd === 'number' && h.fd >= 0 && typeof h.readStop === 'function' && typeof h.readStart === 'function' ? h : undefined;
}

/**
 * Whether the socket's next bytes can be read with readSocketInto: a TCP
 * socket (not TLS) whose stream holds no bytes read but not yet consumed.
 */
export function canReadDirect(socket: Socket): boolean {
  return process.platform === 'linux' && !socket.destroyed && !socket.isPaused() && socket.readableLength === 0 && handleOf(socket)?.reading === true;
}

/**
 * Stops node's reading of the socket and reads exactly dst.byteLength bytes
 * into dst (XOR-ed with `mask` from byte `phase` of the frame on, as a
 * WebSocket payload), then starts node's reading again where it settled
 * with all of them. Call only where canReadDirect(socket) is true, from
 * within the socket's 'data' handler or with it paused. With `ahead`, the
 * bytes that have already come after dst's are read into it too (at most
 * its size, without waiting for more): they come before anything node
 * reads next, so the caller must take them as the socket's next bytes
 * before it yields to the event loop.
 */
export function readSocketInto(socket: Socket, dst: Uint8Array, mask: Uint8Array, phase: number, progressMs: number, ahead?: Uint8Array): SocketRead {
  const handle = handleOf(socket)!;
  // libuv reads only in its poll callback, so once stopped no byte is taken from the descriptor. `reading` stays true:
  // net.Socket's _read (called for more data after every chunk) starts reading again where it is false.
  handle.readStop!();
  const cancel = new Int32Array(1);
  const restart = () => {
    if (!socket.destroyed && handleOf(socket) === handle && handle.reading) handle.readStart!();
  };
  let started: Promise<number>;
  try {
    started = addon.readSocket({ fd: handle.fd!, dst, mask, phase, cancel, progressMs, ...(ahead && { ahead }) });
  } catch (e) {
    // Refused before any read (its arguments): node reads the socket again and the caller sees a failed read.
    started = Promise.reject(e as Error);
  }
  const done = started.then(
    (n) => (restart(), n),
    (e: Error) => {
      restart();
      throw e;
    },
  );
  return { done, cancel: () => Atomics.store(cancel, 0, 1) };
}
