// A host stand-in for the CUDA runtime, for pool_ops.cc only: device memory is
// host memory (counted, and made to fail on demand), copies are memmove
// (host to device ones counted, gH2D), streams and events do nothing, and the
// one <<<>>> launch of the pool (block_pool_ranges.cu GatherTables) runs on
// the host; the scatter kernel writes the staged blocks into the K and V
// pools as the device's does (counted, gScatter; KVR_STUB_SCATTER_SKIP=1
// makes it leave out each launch's last block: a wrong copy that the checks
// must catch; a launch that names a slot twice is counted, gScatterRaces),
// and the decode kernel records the slots it would read (gRead).
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <vector>
#include "cuda/decode_kernel.h"
#include "cuda/device_info.h"

// Device and pinned allocations: live now, made and freed so far (gAllocs in
// pool_ops.cc's "L" op); allocation number gFailAt (from 1) fails, as a
// device out of memory would.
long gLiveDev = 0, gLiveHost = 0, gAllocs = 0, gFrees = 0, gFailAt = 0;
static bool Fail() { return ++gAllocs == gFailAt; }

extern "C" {
cudaError_t cudaMalloc(void** p, size_t n) {
  if (Fail()) return *p = nullptr, cudaErrorMemoryAllocation;
  *p = calloc(1, n ? n : 1);
  ++gLiveDev;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (p) --gLiveDev, ++gFrees;
  free(p);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned int) {
  if (Fail()) return *p = nullptr, cudaErrorMemoryAllocation;
  *p = calloc(1, n ? n : 1);
  ++gLiveHost;
  return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  if (p) --gLiveHost, ++gFrees;
  free(p);
  return cudaSuccess;
}
// Host-to-device copies and scatter launches so far: calls, bytes, blocks scattered, launches with a slot twice.
long gH2D = 0, gH2DBytes = 0, gScatter = 0, gScattered = 0, gScatterRaces = 0;
// KVR_STUB_NO_DEVICE_COPY=1 (bench/native/pool_step.cc, which reads nothing back): host-to-device copies and the
// scatter move no bytes, as they take no host time on a device (their calls' own cost is not modelled either).
static bool NoDeviceCopy() {
  static const bool no = getenv("KVR_STUB_NO_DEVICE_COPY") && atoi(getenv("KVR_STUB_NO_DEVICE_COPY"));
  return no;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t) {
  if (kind == cudaMemcpyHostToDevice) ++gH2D, gH2DBytes += long(n);
  if (!(NoDeviceCopy() && kind == cudaMemcpyHostToDevice)) memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int) { *s = (cudaStream_t)malloc(8); return cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t s) { free(s); return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = (cudaEvent_t)malloc(8); return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) { *e = (cudaEvent_t)malloc(8); return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { free(e); return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
// KVR_STUB_EVENTS_BUSY=1: every other query finds its event's work not done (the pool then waits, or looks further).
long gEventQueries = 0;
cudaError_t cudaEventQuery(cudaEvent_t) {
  static const bool busy = getenv("KVR_STUB_EVENTS_BUSY") && atoi(getenv("KVR_STUB_EVENTS_BUSY"));
  return busy && ++gEventQueries % 2 ? cudaErrorNotReady : cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0; return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "stub"; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
void** __cudaRegisterFatBinary(void*) { static void* h[4]; return h; }
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
void __cudaRegisterFunction(void**, const char*, char*, const char*, int, uint3*, uint3*, dim3*, dim3*, int*) {}
static dim3 gGrid, gBlock; static size_t gShm; static void* gStream;
unsigned __cudaPushCallConfiguration(dim3 g, dim3 b, size_t s, struct CUstream_st* st) { gGrid = g; gBlock = b; gShm = s; gStream = st; return 0; }
cudaError_t __cudaPopCallConfiguration(dim3* g, dim3* b, size_t* s, void* st) { *g = gGrid; *b = gBlock; *s = gShm; *(void**)st = gStream; return cudaSuccess; }
cudaError_t __cudaGetKernel(cudaKernel_t* k, const void* f) { *k = (cudaKernel_t)f; return cudaSuccess; }
struct Piece { const int32_t* src; int64_t dst; int64_t n; };
// GatherTables(pieces, out): the only kernel launched through <<<>>> in the pool.
cudaError_t __cudaLaunchKernel(cudaKernel_t, dim3 grid, dim3, void** args, size_t, cudaStream_t) {
  const Piece* pieces = *(const Piece**)args[0];
  int32_t* out = *(int32_t**)args[1];
  for (unsigned y = 0; y < grid.y; ++y) memcpy(out + pieces[y].dst, pieces[y].src, size_t(pieces[y].n) * 4);
  return cudaSuccess;
}
}

std::vector<std::vector<int32_t>> gRead;  // what the last decode read, per kv head
const uint16_t* gKPool = nullptr;  // the pools the scatter wrote to (pool_ops reads slots back from them)
const uint16_t* gVPool = nullptr;
namespace kvr { namespace cuda {
int ChooseSplits(int, int, int, int64_t) { return 1; }
int LaunchDecode(const DecodeParams& p, void*) {
  gRead.assign(size_t(p.kvHeads), {});
  for (int h = 0; h < p.kvHeads; ++h) {
    const int64_t need = (p.validTokens[h] + (1 << p.blockShift) - 1) >> p.blockShift;
    for (int64_t i = 0; i < need; ++i) gRead[size_t(h)].push_back(p.tables[p.tableOffset[h] + i]);
  }
  return 0;
}
// decode_kernel.cu ScatterKernel: staged block b (K then V, blockWords each) to slot slots[b] of each pool.
int LaunchScatter(const uint16_t* staged, const int32_t* slots, int64_t n, int64_t blockWords, uint16_t* kPool,
                  uint16_t* vPool, void*) {
  static const bool skip = getenv("KVR_STUB_SCATTER_SKIP") && atoi(getenv("KVR_STUB_SCATTER_SKIP"));
  if (n <= 0) return 0;
  gKPool = kPool;
  gVPool = vPool;
  ++gScatter;
  // The device runs a launch's blocks in no order: a slot twice in one launch is a race (which copy lands is unknown).
  std::vector<int32_t> seen(slots, slots + n);
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) ++gScatterRaces;
  for (int64_t b = 0; b < n - (NoDeviceCopy() ? n : skip ? 1 : 0); ++b) {
    memcpy(kPool + size_t(slots[b]) * blockWords, staged + size_t(b) * 2 * blockWords, size_t(blockWords) * 2);
    memcpy(vPool + size_t(slots[b]) * blockWords, staged + size_t(b) * 2 * blockWords + blockWords, size_t(blockWords) * 2);
    ++gScattered;
  }
  return 0;
}
DeviceInfo QueryDevice() { DeviceInfo d; d.ok = true; d.device = "stub"; d.smCount = 132; return d; }
}}
