// Ids name records in LMDB and appear in URLs: a small alphabet keeps them
// from escaping their namespace (no '/', no '..', no control bytes).
import { invalid } from './errors.js';

const ID = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;

export function checkId(id: string, what: string): string {
  if (!ID.test(id) || id.includes('..'))
    throw invalid(`${what} id must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-' and without '..'`);
  return id;
}
