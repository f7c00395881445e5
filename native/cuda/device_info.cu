// The device query behind health and the pool's sizing (see device_info.h).
#include <cuda_runtime.h>

#include "cuda/device_info.h"

namespace kvr {
namespace cuda {

DeviceInfo QueryDevice() {
  DeviceInfo info;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    info.device = e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device";
    cudaGetLastError();
    return info;
  }
  cudaDeviceProp prop;
  e = cudaGetDeviceProperties(&prop, 0);
  if (e != cudaSuccess) {
    info.device = cudaGetErrorString(e);
    cudaGetLastError();
    return info;
  }
  size_t freeB = 0, totalB = 0;
  if (cudaSetDevice(0) == cudaSuccess && cudaMemGetInfo(&freeB, &totalB) == cudaSuccess) info.freeMemory = int64_t(freeB);
  cudaGetLastError();
  info.ok = true;
  info.device = prop.name;
  info.memory = int64_t(prop.totalGlobalMem);
  info.smCount = prop.multiProcessorCount;
  info.major = prop.major;
  info.minor = prop.minor;
  return info;
}

}  // namespace cuda
}  // namespace kvr
