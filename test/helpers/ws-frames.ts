// The frames a raw test client reads from a WebSocket server, taken whole
// off the front of what it has received (RFC 6455 framing; the payload as
// sent, unmasked only if the sender masked it).
export interface RawFrame {
  fin: boolean;
  opcode: number;
  /** A server must never mask (RFC 6455 5.1): tests assert this is false. */
  masked: boolean;
  payload: Buffer;
}

/** The whole frames at the front of `buf`, and the bytes after them (a frame not yet whole stays there). */
export function takeFrames(buf: Buffer): { frames: RawFrame[]; rest: Buffer } {
  const frames: RawFrame[] = [];
  for (;;) {
    if (buf.length < 2) break;
    let len = buf[1] & 0x7f, at = 2;
    if (len === 126) {
      if (buf.length < 4) break;
      len = buf.readUInt16BE(2);
      at = 4;
    } else if (len === 127) {
      if (buf.length < 10) break;
      len = Number(buf.readBigUInt64BE(2));
      at = 10;
    }
    const masked = (buf[1] & 0x80) !== 0;
    if (masked) at += 4;
    if (buf.length < at + len) break;
    frames.push({ fin: (buf[0] & 0x80) !== 0, opcode: buf[0] & 0x0f, masked, payload: Buffer.from(buf.subarray(at, at + len)) });
    buf = buf.subarray(at + len);
  }
  return { frames, rest: buf };
}
