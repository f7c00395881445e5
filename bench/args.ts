// Command-line flags of the benches: `--name value`.

/** The word after `--name` on the command line, or undefined where the flag is absent. */
export function strFlag(name: string, argv: readonly string[] = process.argv): string | undefined {
  const at = argv.indexOf(name);
  return at >= 0 ? argv[at + 1] : undefined;
}

/** The number after `--name` on the command line, or undefined where the flag is absent. */
export function numFlag(name: string, argv: readonly string[] = process.argv): number | undefined {
  const at = argv.indexOf(name);
  return at >= 0 ? Number(argv[at + 1]) : undefined;
}
