// The layout is the architecture: imports run only downward through the
// layers, clients stand apart from the engine, no source file outgrows one
// sitting, and the README's result blocks are what bench/results renders.
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const ROOT = resolve(import.meta.dirname, '..');
/** Bottom to top: a file may import its own layer or any below it. */
const LAYERS = ['addon', 'core', 'storage', 'index', 'engine/cache', 'engine', 'api', 'cli'];
/** Besides their own folder, what the clients and the workload generator may import. */
const APART: Record<string, string[]> = { 'clients/ts': ['core'], workload: ['addon'] };
/** The CLI, on top, also drives the TypeScript client (preload). */
const CLI_USES = 'clients/ts/';

function files(dir: string, ext: RegExp): string[] {
  return readdirSync(join(ROOT, dir)).flatMap((name) => {
    const p = join(dir, name);
    if (statSync(join(ROOT, p)).isDirectory()) return files(p, ext);
    return ext.test(name) ? [p] : [];
  });
}

const layerOf = (file: string) => {
  const candidates = LAYERS.map((l, i) => [l, i] as const).filter(([l]) => file.startsWith(l + '/'));
  return candidates.length ? candidates.sort((a, b) => b[0].length - a[0].length)[0] : undefined;
};

function imports(file: string): string[] {
  const text = readFileSync(join(ROOT, file), 'utf8');
  return [...text.matchAll(/(?:from|import)\s*\(?\s*'(\.{1,2}\/[^']+)'/g)].map((m) => relative(ROOT, resolve(ROOT, dirname(file), m[1])));
}

describe('layout', () => {
  it('no import runs back up the layers; clients and the workload generator stand apart', () => {
    const wrong: string[] = [];
    for (const layer of [...LAYERS, ...Object.keys(APART)])
      for (const file of files(layer, /\.ts$/)) {
        const own = layerOf(file);
        for (const target of imports(file)) {
          const apart = Object.entries(APART).find(([dir]) => file.startsWith(dir + '/'));
          if (apart) {
            if (!target.startsWith(apart[0] + '/') && !apart[1].some((l) => target.startsWith(l + '/'))) wrong.push(`${file} → ${target}`);
            continue;
          }
          if (file.startsWith('cli/') && target.startsWith(CLI_USES)) continue;
          const to = layerOf(target);
          if (!to || (own && to[1] > own[1])) wrong.push(`${file} → ${target}`);
        }
      }
    expect(wrong).toEqual([]);
  });

  it('no source file outside the tests is over 600 lines', () => {
    const big = ['addon', 'core', 'storage', 'index', 'engine', 'api', 'cli', 'clients', 'bench', 'workload', 'native', 'scripts']
      .flatMap((d) => files(d, /\.(ts|mjs|cc|cu|h|py)$/))
      .map((f) => [f, readFileSync(join(ROOT, f), 'utf8').split('\n').length] as const)
      .filter(([, n]) => n > 600);
    expect(big).toEqual([]);
  });

  it("every CUDA header is an input of binding.gyp's nvcc rule, so a change to it alone rebuilds the kernels", () => {
    const gyp = readFileSync(join(ROOT, 'binding.gyp'), 'utf8');
    const inputs = new Set([...gyp.matchAll(/"(native\/cuda\/[^"]+)"/g)].map((m) => m[1]));
    expect(files('native/cuda', /\.(cuh|h)$/).filter((f) => !inputs.has(f))).toEqual([]);
  });

  it("the README's result blocks are rendered from bench/results", () => {
    execFileSync(process.execPath, [join(ROOT, 'scripts', 'render-results.mjs'), '--check'], { cwd: ROOT, stdio: 'pipe' });
  });
});
