// bench:model's Python helpers (bench/model/): merging per-trial meters from parallel workers and runs, the
// packed held-out corpus, the torch float64 reference (when torch is installed). Runs test/bench/model_helpers.py;
// skipped when no python3 with numpy and msgpack is found (as test/integration/python-client.test.ts).
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { findPython } from '../helpers/python.js';

const ROOT = join(import.meta.dirname, '..', '..');

const python = findPython();
if (!python) console.warn('bench model helpers: skipped, no python3 with numpy and msgpack');

describe.skipIf(!python)('bench:model helpers', () => {
  it('pass their unittest suite', () => {
    const r = spawnSync(python!, [join(ROOT, 'test', 'bench', 'model_helpers.py'), '-v'], {
      cwd: ROOT,
      env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' },
      encoding: 'utf8',
      timeout: 50_000,
    });
    const output = `${r.stdout}${r.stderr}`;
    if (r.status !== 0) console.log(output);
    expect(r.status).toBe(0);
    expect(output).toMatch(/test_workers_in_any_order_summarise_as_one_sequential_meter .*\.\.\. ok/);
    expect(output).toMatch(/test_packed_bytes_are_the_folders .*\.\.\. ok/);
    expect(output).toMatch(/test_runs_of_other_configurations_merge .*\.\.\. ok/);
    expect(output).toMatch(/test_sums_as_the_trials_and_refuses_a_trial_twice .*\.\.\. ok/);
  });
});
