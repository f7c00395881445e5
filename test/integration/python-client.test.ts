// The Python client (clients/python) against a real in-process server: runs
// its unittest suite with KVRECALL_URL set. Skipped when no python3 with
// numpy and msgpack is found (Debian: apt-get install python3-numpy
// python3-msgpack; a pyenv python3 may not see them, so /usr/bin/python3 is
// tried too; KVRECALL_PYTHON picks one).
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RunningServer } from '../../api/server.js';
import { startInProcess, tempDataDir } from '../helpers/server.js';
import { findPython } from '../helpers/python.js';

const ROOT = join(import.meta.dirname, '..', '..');

const python = findPython();
if (!python) console.warn('python-client: skipped, no python3 with numpy and msgpack (apt-get install python3-numpy python3-msgpack)');

/** Runs a command without blocking the event loop (the server lives in this process). */
function run(cmd: string, args: string[], env: Record<string, string>, timeoutMs: number): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (b: Buffer) => (output += b.toString()));
    child.stderr.on('data', (b: Buffer) => (output += b.toString()));
    const timer = setTimeout(() => {
      output += `\n[killed after ${timeoutMs} ms]`;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    });
  });
}

describe.skipIf(!python)('Python client', () => {
  const tmp = tempDataDir();
  let server: RunningServer;

  beforeAll(async () => {
    server = await startInProcess(tmp.dir);
  });
  afterAll(async () => {
    await server?.close();
    tmp.cleanup();
  });

  it('passes its unittest suite against a real server', async () => {
    const { code, output } = await run(
      python!,
      ['-m', 'unittest', 'discover', '-s', 'clients/python/tests', '-v'],
      { KVRECALL_URL: server.url, PYTHONDONTWRITEBYTECODE: '1', PYTHONUNBUFFERED: '1' },
      50_000,
    );
    if (code !== 0) console.log(output);
    expect(code).toBe(0);
    // The server-backed tests ran (not skipped).
    expect(output).toMatch(/test_attend_matches_float64_reference .*\.\.\. ok/);
    expect(output).toMatch(/test_errors_map_to_status_and_code .*\.\.\. ok/);
    expect(output).toMatch(/test_f32_q_is_read_in_place_over_http_and_the_stream .*\.\.\. ok/);
    // The stacked batch through the stream's segment, wherever there is /dev/shm.
    if (existsSync('/dev/shm')) expect(output).toMatch(/test_answers_match_attend_batch_and_single_attends .*\.\.\. ok/);
    // https through the test's TLS proxy wherever openssl can make its certificate.
    if (spawnSync('sh', ['-c', 'command -v openssl']).status === 0) expect(output).toMatch(/test_health_document_session_and_attends_match_http .*\.\.\. ok/);
    // The real model's short-context check ran wherever the model sits beside the repository (CI has ../shared).
    if (existsSync(join(ROOT, '..', 'shared', 'data', 'models', 'kvrecall-code-13M', 'config.json'))) {
      expect(output).toMatch(/test_exact_reproduces_dense .*\.\.\. ok/);
      expect(output).toMatch(/test_every_method_at_a_full_budget_reproduces_dense .*\.\.\. ok/);
    }
  });
});
