// Rows of calls timed in turns (one sitting: each row's calls spread over
// every round, so a drift of the machine's load falls on all of them alike):
// 20 warm-up calls of each row, then `rounds` rounds, each running every row
// `calls / rounds` times, its wait (`before`) untimed before each call.
export interface InterleavedRow {
  before(): unknown;
  call(): Promise<unknown>;
}

/** Runs the rows in turns; `timed` makes one timed call of a row and keeps what it measured; `progress` hears each round's end. */
export async function runInterleaved<R extends InterleavedRow>(
  rows: readonly R[],
  o: { calls: number; rounds: number; timed: (row: R) => Promise<void>; progress: (msg: string) => void },
): Promise<void> {
  for (let w = 0; w < 20; w++) for (const r of rows) await r.call();
  const block = Math.max(1, Math.round(o.calls / o.rounds));
  for (let round = 0; round < o.rounds; round++) {
    for (const r of rows)
      for (let i = 0; i < block; i++) {
        await r.before();
        await o.timed(r);
      }
    o.progress(`round ${round + 1}/${o.rounds}`);
  }
}
