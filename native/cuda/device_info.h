// Which CUDA device the process sees (the first), for health and the pool's
// sizing. Plain C++ interface: the binding compiles it with the host compiler.
#pragma once

#include <cstdint>
#include <string>

namespace kvr {
namespace cuda {

struct DeviceInfo {
  bool ok = false;
  std::string device;  // name, or the reason there is none
  int64_t memory = 0;  // total bytes
  int64_t freeMemory = 0;
  int smCount = 0;
  int major = 0, minor = 0;
};

// Never throws: ok = false with the reason when no driver/device answers.
DeviceInfo QueryDevice();

}  // namespace cuda
}  // namespace kvr
