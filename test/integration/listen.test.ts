// A server asked for a port already taken says so and what to change,
// instead of an unhandled 'error' event (a stack trace, and for the CLI no
// hint that --port chooses another); the server that holds the port goes on.
// A failed accept after listening (EMFILE) does not end the server either.
import { describe, expect, it } from 'vitest';
import { startInProcess, tempDataDir, useServer } from '../helpers/server.js';

const live = useServer();

describe('listen', () => {
  it('refuses a port in use with the address and the flag to change', async () => {
    const port = live.port();
    const tmp = tempDataDir();
    try {
      await expect(startInProcess(tmp.dir, { port })).rejects.toThrow(
        new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}: the address is in use; choose another with --port`),
      );
      // Its engine was closed: the same data folder opens again on a free port.
      const again = await startInProcess(tmp.dir);
      await again.close();
    } finally {
      tmp.cleanup();
    }
    expect((await live.client().health()).ok).toBe(true);
  });

  it('serves on after a failed accept', async () => {
    const emfile = Object.assign(new Error('accept EMFILE'), { code: 'EMFILE', syscall: 'accept' });
    // Unheard, emit() throws it (and in a server, ends the process).
    expect(() => live.server().http.emit('error', emfile)).not.toThrow();
    expect((await live.client().health()).ok).toBe(true);
  });
});
