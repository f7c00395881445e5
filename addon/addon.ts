// The one place that loads the compiled addon (build/Release/kvrecall.node).
// addon/kernels.ts, addon/ra-graph.ts and addon/faiss.ts take their typed
// views of it from here.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error('kvrecall: package root not found');
    dir = up;
  }
  return dir;
}

const addon: unknown = createRequire(import.meta.url)(join(packageRoot(), 'build', 'Release', 'kvrecall.node'));

/** The addon's exports, typed by the caller's view of them. */
export function nativeAddon<T>(): T {
  return addon as T;
}
