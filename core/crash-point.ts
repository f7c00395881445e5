// Named points where the crash-safety tests stop the process: with
// KVRECALL_CRASH_AT=<name> the server kills itself (SIGKILL: nothing
// flushed, nothing cleaned up) on reaching that point, and the test restarts
// it over exactly the disk a crash there leaves. Unset, as outside those
// tests, a point costs one comparison.
const armed = process.env.KVRECALL_CRASH_AT;

export function crashPoint(name: string): void {
  if (armed === name) process.kill(process.pid, 'SIGKILL');
}
