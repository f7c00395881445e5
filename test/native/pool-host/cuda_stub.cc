// A host stand-in for the CUDA runtime, for pool_ops.cc only: device memory is
// host memory (counted, and made to fail on demand), copies are memmove,
// streams and events do nothing, and the one <<<>>> launch of the pool
// (block_pool_ranges.cu GatherTables) runs on the host; the decode kernel
// records the slots it would read (gRead).
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
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
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) { memmove(d, s, n); return cudaSuccess; }
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
int LaunchScatter(const uint16_t*, const int32_t*, int64_t, int64_t, uint16_t*, uint16_t*, void*) { return 0; }
void MergeLseHost(float*, float*, const float*, const float*, int, int) {}
DeviceInfo QueryDevice() { DeviceInfo d; d.ok = true; d.device = "stub"; d.smCount = 132; return d; }
}}
