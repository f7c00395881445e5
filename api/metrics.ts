// Prometheus text exposition of a few counters and gauges.
export class Metrics {
  private readonly requests = new Map<string, number>();
  attendCount = 0;
  attendSeconds = 0;
  /** Gauges read when /metrics is asked, kept by the parts that own them (names without the kvrecall_ prefix). */
  readonly gauges = new Map<string, () => number>();

  countRequest(route: string, status: number): void {
    const key = `route="${route}",status="${status}"`;
    this.requests.set(key, (this.requests.get(key) ?? 0) + 1);
  }

  observeAttend(ms: number): void {
    this.attendCount++;
    this.attendSeconds += ms / 1000;
  }

  /** `counters`: totals kept outside this object (names without the kvrecall_ prefix). */
  render(gauges: Record<string, number>, counters: Record<string, number> = {}): string {
    const lines = ['# TYPE kvrecall_requests_total counter'];
    for (const [labels, n] of this.requests) lines.push(`kvrecall_requests_total{${labels}} ${n}`);
    lines.push('# TYPE kvrecall_attend_seconds summary');
    lines.push(`kvrecall_attend_seconds_sum ${this.attendSeconds}`);
    lines.push(`kvrecall_attend_seconds_count ${this.attendCount}`);
    for (const [name, v] of Object.entries(gauges)) lines.push(`# TYPE kvrecall_${name} gauge`, `kvrecall_${name} ${v}`);
    for (const [name, read] of this.gauges) lines.push(`# TYPE kvrecall_${name} gauge`, `kvrecall_${name} ${read()}`);
    for (const [name, v] of Object.entries(counters)) lines.push(`# TYPE kvrecall_${name} counter`, `kvrecall_${name} ${v}`);
    return lines.join('\n') + '\n';
  }
}
