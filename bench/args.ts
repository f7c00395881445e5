// Command-line flags of the benches that take numbers: `--name N`.

/** The number after `--name` on the command line, or undefined where the flag is absent. */
export function numFlag(name: string, argv: readonly string[] = process.argv): number | undefined {
  const at = argv.indexOf(name);
  return at >= 0 ? Number(argv[at + 1]) : undefined;
}
