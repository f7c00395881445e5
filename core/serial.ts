// Runs the operations on one key (a document, a session) one at a time, in
// arrival order, so an append never races the attend that reads it.
export class KeyedQueue {
  private readonly tails = new Map<string, Promise<unknown>>();

  run<T>(key: string, op: () => Promise<T> | T): Promise<T> {
    const prev = this.tails.get(key) ?? Promise.resolve();
    return this.follow(key, prev.then(op, op));
  }

  /**
   * As run(), but with nothing queued on the key, op starts at once, in the
   * caller's turn, not a microtask later: a decode step's native work then
   * starts before the rest of the turn that read its request runs, instead
   * of after it.
   */
  runNow<T>(key: string, op: () => Promise<T> | T): Promise<T> {
    const prev = this.tails.get(key);
    if (prev) return this.follow(key, prev.then(op, op));
    let next: Promise<T>;
    try {
      next = Promise.resolve(op());
    } catch (e) {
      next = Promise.reject(e);
    }
    return this.follow(key, next);
  }

  /** `next` becomes the key's tail (settled either way), dropped once it settles unless another op followed it. */
  private follow<T>(key: string, next: Promise<T>): Promise<T> {
    const settled = (): void => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    };
    const tail: Promise<void> = next.then(settled, settled);
    this.tails.set(key, tail);
    return next;
  }
}
