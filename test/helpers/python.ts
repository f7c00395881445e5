// The python3 the Python-side tests run: one with numpy and msgpack
// (Debian: apt-get install python3-numpy python3-msgpack). A pyenv python3
// may not see Debian's packages, so /usr/bin/python3 is tried too;
// KVRECALL_PYTHON picks one. Undefined when none has them (the tests skip).
import { spawnSync } from 'node:child_process';

export function findPython(): string | undefined {
  const candidates = [process.env.KVRECALL_PYTHON, 'python3', '/usr/bin/python3'].filter((p): p is string => !!p);
  for (const py of candidates) {
    const r = spawnSync(py, ['-c', 'import numpy, msgpack'], { stdio: 'ignore', timeout: 20_000 });
    if (r.status === 0) return py;
  }
  return undefined;
}
