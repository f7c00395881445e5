// The server's configuration from flags and environment (core/config.ts):
// the GPU budgets and the stream limits among them, and bad values refused
// with the flag named.
import { describe, expect, it } from 'vitest';
import { DEFAULTS, parseConfig } from '../../core/config.js';

describe('parseConfig', () => {
  it('takes the pool and the wave budgets from flags, and from the environment when no flag says', () => {
    expect(parseConfig([], {})).toEqual(DEFAULTS);
    const cfg = parseConfig(['--gpu-budget', '1024', '--gpu-wave-budget', '4294967296'], {});
    expect(cfg.gpuBudget).toBe(1024);
    expect(cfg.gpuWaveBudget).toBe(4294967296);
    const env = parseConfig([], { KVRECALL_GPU_BUDGET: '0', KVRECALL_GPU_WAVE_BUDGET: '8589934592' });
    expect(env.gpuBudget).toBe(0);
    expect(env.gpuWaveBudget).toBe(8589934592);
    expect(parseConfig(['--gpu-wave-budget', '7'], { KVRECALL_GPU_WAVE_BUDGET: '9' }).gpuWaveBudget).toBe(7);
    expect(parseConfig(['--gpu-scan-budget', '3000000000'], {}).gpuScanBudget).toBe(3000000000);
    expect(parseConfig([], { KVRECALL_GPU_SCAN_BUDGET: '12' }).gpuScanBudget).toBe(12);
    expect(parseConfig(['--gpu-scan-budget', '7'], { KVRECALL_GPU_SCAN_BUDGET: '9' }).gpuScanBudget).toBe(7);
  });

  it('takes the paged wave stores\' cache as a share of a layer\'s rows in [0, 1], off unless asked', () => {
    expect(parseConfig([], {}).gpuWaveCache).toBeUndefined();
    expect(parseConfig(['--gpu-wave-cache', '0.1'], {}).gpuWaveCache).toBe(0.1);
    expect(parseConfig([], { KVRECALL_GPU_WAVE_CACHE: '0.25' }).gpuWaveCache).toBe(0.25);
    expect(parseConfig(['--gpu-wave-cache', '0'], { KVRECALL_GPU_WAVE_CACHE: '0.5' }).gpuWaveCache).toBe(0);
    expect(() => parseConfig(['--gpu-wave-cache', '1.5'], {})).toThrow(/--gpu-wave-cache/);
    expect(() => parseConfig(['--gpu-wave-cache', '-0.1'], {})).toThrow(/--gpu-wave-cache/);
    expect(() => parseConfig(['--gpu-wave-cache', ''], {})).toThrow(/--gpu-wave-cache/);
    expect(() => parseConfig([], { KVRECALL_GPU_WAVE_CACHE: 'tenth' })).toThrow(/KVRECALL_GPU_WAVE_CACHE/);
  });

  it('takes the paged wave stores\' cap on a step\'s bytes from --gpu-wave-page-cap or KVRECALL_GPU_WAVE_PAGE_CAP, unset unless asked', () => {
    expect(parseConfig([], {}).gpuWavePageCap).toBeUndefined();
    expect(parseConfig(['--gpu-wave-page-cap', '1048576'], {}).gpuWavePageCap).toBe(1048576);
    expect(parseConfig([], { KVRECALL_GPU_WAVE_PAGE_CAP: '0' }).gpuWavePageCap).toBe(0);
    expect(parseConfig(['--gpu-wave-page-cap', '5'], { KVRECALL_GPU_WAVE_PAGE_CAP: '9' }).gpuWavePageCap).toBe(5);
    expect(() => parseConfig(['--gpu-wave-page-cap', '-1'], {})).toThrow(/--gpu-wave-page-cap/);
    expect(() => parseConfig([], { KVRECALL_GPU_WAVE_PAGE_CAP: '2MiB' })).toThrow(/KVRECALL_GPU_WAVE_PAGE_CAP/);
  });

  it('takes the shared-memory directory from --shm-dir or KVRECALL_SHM_DIR, /dev/shm unless set, off as off', () => {
    expect(parseConfig([], {}).shmDir).toBe('/dev/shm');
    expect(parseConfig(['--shm-dir', '/run/kv'], {}).shmDir).toBe('/run/kv');
    expect(parseConfig([], { KVRECALL_SHM_DIR: '/tmp/x' }).shmDir).toBe('/tmp/x');
    expect(parseConfig(['--shm-dir', '/a'], { KVRECALL_SHM_DIR: '/b' }).shmDir).toBe('/a');
    expect(parseConfig(['--shm-dir', 'off'], {}).shmDir).toBeUndefined();
    expect(parseConfig([], { KVRECALL_SHM_DIR: 'off' }).shmDir).toBeUndefined();
    expect(() => parseConfig(['--shm-dir', 'shm'], {})).toThrow(/--shm-dir/);
  });

  it('takes the caps on mapped segment bytes from --shm-stream-bytes / --shm-total-bytes or their variables, 1 GiB and 8 GiB unless set', () => {
    expect(parseConfig([], {})).toMatchObject({ shmStreamBytes: 2 ** 30, shmTotalBytes: 8 * 2 ** 30 });
    expect(parseConfig(['--shm-stream-bytes', '65536', '--shm-total-bytes', '131072'], {})).toMatchObject({ shmStreamBytes: 65536, shmTotalBytes: 131072 });
    expect(parseConfig([], { KVRECALL_SHM_STREAM_BYTES: '4096', KVRECALL_SHM_TOTAL_BYTES: '8192' })).toMatchObject({ shmStreamBytes: 4096, shmTotalBytes: 8192 });
    expect(parseConfig(['--shm-total-bytes', '100'], { KVRECALL_SHM_TOTAL_BYTES: '8192' }).shmTotalBytes).toBe(100);
    expect(() => parseConfig(['--shm-stream-bytes', '-1'], {})).toThrow(/--shm-stream-bytes/);
    expect(() => parseConfig([], { KVRECALL_SHM_TOTAL_BYTES: 'lots' })).toThrow(/KVRECALL_SHM_TOTAL_BYTES/);
  });

  it('takes each cap as a positive integer, refuses 0 (pointing at --shm-dir off) and a stream cap over the total, naming both', () => {
    for (const [argv, env, flag] of [
      [['--shm-stream-bytes', '0'], {}, '--shm-stream-bytes'],
      [['--shm-total-bytes', '0'], {}, '--shm-total-bytes'],
      [[], { KVRECALL_SHM_STREAM_BYTES: '0' }, 'KVRECALL_SHM_STREAM_BYTES'],
      [[], { KVRECALL_SHM_TOTAL_BYTES: '0' }, 'KVRECALL_SHM_TOTAL_BYTES'],
    ] as const)
      expect(() => parseConfig([...argv], env), `${argv.join(' ')} ${JSON.stringify(env)}`).toThrow(new RegExp(`${flag}.*positive number of bytes.*--shm-dir off`));
    const over = /--shm-stream-bytes 8192 \(KVRECALL_SHM_STREAM_BYTES\) is over --shm-total-bytes 4096 \(KVRECALL_SHM_TOTAL_BYTES\)/;
    expect(() => parseConfig(['--shm-stream-bytes', '8192', '--shm-total-bytes', '4096'], {})).toThrow(over);
    expect(() => parseConfig(['--shm-total-bytes', '4096'], { KVRECALL_SHM_STREAM_BYTES: '8192' })).toThrow(over);
    expect(() => parseConfig([], { KVRECALL_SHM_STREAM_BYTES: '8192', KVRECALL_SHM_TOTAL_BYTES: '4096' })).toThrow(over);
    // Over the default total (8 GiB): set, so refused too.
    expect(() => parseConfig(['--shm-stream-bytes', String(16 * 2 ** 30)], {})).toThrow(/--shm-stream-bytes 17179869184 .* is over --shm-total-bytes 8589934592/);
    // Equal is a stream that may map all of it.
    expect(parseConfig(['--shm-stream-bytes', '4096', '--shm-total-bytes', '4096'], {})).toMatchObject({ shmStreamBytes: 4096, shmTotalBytes: 4096 });
    // Only the total set, under the stream cap's default: the default follows it (nothing contradictory was asked).
    expect(parseConfig(['--shm-total-bytes', '65536'], {})).toMatchObject({ shmStreamBytes: 65536, shmTotalBytes: 65536 });
    expect(parseConfig([], { KVRECALL_SHM_TOTAL_BYTES: '100' })).toMatchObject({ shmStreamBytes: 100, shmTotalBytes: 100 });
    // A total over the default stream cap leaves it as it is.
    expect(parseConfig(['--shm-total-bytes', String(2 ** 31)], {})).toMatchObject({ shmStreamBytes: 2 ** 30, shmTotalBytes: 2 ** 31 });
  });

  it('takes the loop\'s polling after answers from --poll-us or KVRECALL_POLL_US, 0 (off) unless set, at most a second', () => {
    expect(parseConfig([], {}).pollUs).toBeUndefined(); // the server's default: api/loop-poll.ts defaultPollUs
    expect(parseConfig(['--poll-us', '500'], {}).pollUs).toBe(500);
    expect(parseConfig([], { KVRECALL_POLL_US: '200' }).pollUs).toBe(200);
    expect(parseConfig(['--poll-us', '0'], { KVRECALL_POLL_US: '200' }).pollUs).toBe(0);
    expect(() => parseConfig(['--poll-us', '1000001'], {})).toThrow(/--poll-us/);
    expect(() => parseConfig(['--poll-us', '-1'], {})).toThrow(/--poll-us/);
    expect(() => parseConfig([], { KVRECALL_POLL_US: 'soon' })).toThrow(/KVRECALL_POLL_US/);
  });

  it('takes k-means on the device as 0 or 1, off unless asked', () => {
    expect(parseConfig([], {}).gpuKmeans).toBeUndefined();
    expect(parseConfig(['--gpu-kmeans', '1'], {}).gpuKmeans).toBe(1);
    expect(parseConfig([], { KVRECALL_GPU_KMEANS: '1' }).gpuKmeans).toBe(1);
    expect(parseConfig(['--gpu-kmeans', '0'], { KVRECALL_GPU_KMEANS: '1' }).gpuKmeans).toBe(0);
    expect(() => parseConfig(['--gpu-kmeans', '2'], {})).toThrow(/--gpu-kmeans/);
    expect(() => parseConfig([], { KVRECALL_GPU_KMEANS: 'yes' })).toThrow(/KVRECALL_GPU_KMEANS/);
  });

  it('refuses a budget that is not a non-negative integer, naming where it came from', () => {
    expect(() => parseConfig(['--gpu-wave-budget', '-1'], {})).toThrow(/--gpu-wave-budget/);
    expect(() => parseConfig(['--gpu-wave-budget', '1.5'], {})).toThrow(/--gpu-wave-budget/);
    expect(() => parseConfig(['--gpu-scan-budget', '-1'], {})).toThrow(/--gpu-scan-budget/);
    expect(() => parseConfig([], { KVRECALL_GPU_SCAN_BUDGET: 'lots' })).toThrow(/KVRECALL_GPU_SCAN_BUDGET/);
    expect(() => parseConfig([], { KVRECALL_GPU_WAVE_BUDGET: 'lots' })).toThrow(/KVRECALL_GPU_WAVE_BUDGET/);
    expect(() => parseConfig(['--gpu-wave-budget'], {})).toThrow(/incomplete/);
  });

  it('takes the stream limits from flags and the environment, and refuses an idle time of 0', () => {
    expect(DEFAULTS.maxStreams).toBe(1024);
    expect(DEFAULTS.streamIdleMs).toBe(30_000);
    const cfg = parseConfig(['--max-streams', '8', '--stream-idle-ms', '250'], {});
    expect([cfg.maxStreams, cfg.streamIdleMs]).toEqual([8, 250]);
    const env = parseConfig([], { KVRECALL_MAX_STREAMS: '3', KVRECALL_STREAM_IDLE_MS: '1000' });
    expect([env.maxStreams, env.streamIdleMs]).toEqual([3, 1000]);
    expect(parseConfig(['--max-streams', '5'], { KVRECALL_MAX_STREAMS: '3' }).maxStreams).toBe(5);
    expect(() => parseConfig(['--max-streams', '-2'], {})).toThrow(/--max-streams/);
    expect(() => parseConfig(['--stream-idle-ms', '0'], {})).toThrow(/--stream-idle-ms/);
    expect(() => parseConfig(['--stream-idle-ms', String(2 ** 30 + 1)], {})).toThrow(/--stream-idle-ms/);
    expect(parseConfig(['--stream-idle-ms', String(2 ** 30)], {}).streamIdleMs).toBe(2 ** 30);
    expect(() => parseConfig([], { KVRECALL_STREAM_IDLE_MS: 'soon' })).toThrow(/KVRECALL_STREAM_IDLE_MS/);
  });

  it('takes a port in [0, 65535], naming the flag past it', () => {
    expect(parseConfig(['--port', '65535'], {}).port).toBe(65535);
    expect(parseConfig(['--port', '0'], {}).port).toBe(0);
    expect(() => parseConfig(['--port', '99999'], {})).toThrow(/--port takes a TCP port in \[0, 65535\]/);
    expect(() => parseConfig(['--port', 'http'], {})).toThrow(/--port/);
  });

  it('takes the attend thread cap from --attend-sync-work or KVRECALL_ATTEND_SYNC_WORK, unset by default', () => {
    expect(parseConfig([], {}).attendSyncWork).toBeUndefined();
    expect(parseConfig(['--attend-sync-work', '0'], {}).attendSyncWork).toBe(0);
    expect(parseConfig([], { KVRECALL_ATTEND_SYNC_WORK: '4096' }).attendSyncWork).toBe(4096);
    expect(parseConfig(['--attend-sync-work', '7'], { KVRECALL_ATTEND_SYNC_WORK: '4096' }).attendSyncWork).toBe(7);
    expect(() => parseConfig(['--attend-sync-work', '-1'], {})).toThrow(/--attend-sync-work/);
    expect(() => parseConfig([], { KVRECALL_ATTEND_SYNC_WORK: 'lots' })).toThrow(/KVRECALL_ATTEND_SYNC_WORK/);
  });

  it('takes the GPU calls\' thread cap from --gpu-sync-us or KVRECALL_GPU_SYNC_US, unset by default', () => {
    expect(parseConfig([], {}).gpuSyncUs).toBeUndefined();
    expect(parseConfig(['--gpu-sync-us', '0'], {}).gpuSyncUs).toBe(0);
    expect(parseConfig([], { KVRECALL_GPU_SYNC_US: '2500' }).gpuSyncUs).toBe(2500);
    expect(parseConfig(['--gpu-sync-us', '7'], { KVRECALL_GPU_SYNC_US: '2500' }).gpuSyncUs).toBe(7);
    expect(() => parseConfig(['--gpu-sync-us', '-1'], {})).toThrow(/--gpu-sync-us/);
    expect(() => parseConfig([], { KVRECALL_GPU_SYNC_US: 'lots' })).toThrow(/KVRECALL_GPU_SYNC_US/);
  });
});
