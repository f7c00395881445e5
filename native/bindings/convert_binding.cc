// convert({src: Uint8Array, from, dst: Uint8Array, to, count})
// firstNonFinite(src: Uint8Array, dtype, count) -> index or -1
// prefault(arrays: TypedArray[]) -> Promise<whether the kernel faulted their pages in>
// writeBackDrop(paths: string[]) -> Promise<whether every file's pages were written and dropped>
// collapseHugePages(arrays: TypedArray[]) -> Promise<bytes now in 2 MiB pages>
#include <fcntl.h>
#include <napi.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/binding_args.h"
#include "kernels/convert.h"

namespace kvr {
namespace {

Napi::Value ConvertJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const Dtype from = ParseDtype(o, "from"), to = ParseDtype(o, "to");
  const size_t n = size_t(Int(o, "count", 0, int64_t(1) << 40));
  auto src = TypedAt<uint8_t>(o, "src", n * DtypeBytes(from));
  auto dst = TypedAt<uint8_t>(o, "dst", n * DtypeBytes(to));
  Convert(src.Data(), from, dst.Data(), to, n);
  return info.Env().Undefined();
}

Napi::Value FirstNonFiniteJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  const Dtype dtype = ParseDtype(o, "dtype");
  const size_t n = size_t(Int(o, "count", 0, int64_t(1) << 40));
  auto src = TypedAt<uint8_t>(o, "src", n * DtypeBytes(dtype));
  return Napi::Number::New(info.Env(), double(FirstNonFinite(src.Data(), dtype, n)));
}

// Large host arrays (a document's K/V, filled once by uploads) were first
// touched by the copy that fills them, on the event loop: a page fault and a
// zeroed page per 4 KiB held that copy to ~2 GB/s where a warm one runs at
// ~10 GB/s (2-core VM). This faults the array's pages in on a libuv thread
// (MADV_POPULATE_WRITE, Linux 5.14+), ahead of the copies: it never changes
// the contents, so copies may run while it does. False where the kernel
// lacks it. (2 MiB pages would fault less, but on "madvise" their direct
// compaction stalled fills for 0.3-0.4 s at a time on the VM.)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
Napi::Value PrefaultJs(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(info.Env(), "prefault: an array of typed arrays");
  auto list = info[0].As<Napi::Array>();
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  std::vector<Napi::Value> keep{list};
  for (uint32_t i = 0; i < list.Length(); ++i) {
    Napi::Value v = list.Get(i);
    if (!v.IsTypedArray()) throw Napi::TypeError::New(info.Env(), "prefault: an array of typed arrays");
    auto a = v.As<Napi::Uint8Array>();
    const uintptr_t begin = reinterpret_cast<uintptr_t>(a.Data());
    const uintptr_t from = (begin + page - 1) & ~(page - 1), to = (begin + a.ByteLength()) & ~(page - 1);
    if (to > from) ranges.emplace_back(from, to);
  }
  auto done = std::make_shared<bool>(false);
  return RunAsync(
      info.Env(), std::move(keep),
      [ranges, done]() {
        // In steps: each call holds the process's mmap lock, which allocations on the event loop wait for.
        constexpr uintptr_t kStep = uintptr_t(1) << 20;
        *done = true;
        for (auto [from, to] : ranges)
          for (uintptr_t at = from; at < to && *done; at += kStep)
            *done = madvise(reinterpret_cast<void*>(at), std::min(kStep, to - at), MADV_POPULATE_WRITE) == 0;
      },
      [done](Napi::Env e) { return Napi::Boolean::New(e, *done); });
}

// A loading document's LMDB files are written without a sync (flushed
// once, at seal), so every byte of a preload stayed in the page cache: at
// 8.6 GB a fresh page cache as large as the document, each page first
// touched by LMDB's pwritev (the copy in the kernel 2-3 s of system CPU a GB
// past the first few GB on the 2-core VM, whose balloon reports free memory
// to the host: any first write into it costs that much, anonymous memory
// alike). This writes a file's dirty pages and waits for them
// (sync_file_range: the data, no journal commit; not a durability point),
// then drops its clean pages that no process maps (POSIX_FADV_DONTNEED), so
// the next writes reuse pages already in use. False where a file does not
// open or the kernel refuses (other systems: nothing is done).
Napi::Value WriteBackDropJs(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(info.Env(), "writeBackDrop: an array of file paths");
  auto list = info[0].As<Napi::Array>();
  std::vector<std::string> paths;
  for (uint32_t i = 0; i < list.Length(); ++i) {
    Napi::Value v = list.Get(i);
    if (!v.IsString()) throw Napi::TypeError::New(info.Env(), "writeBackDrop: an array of file paths");
    paths.push_back(v.As<Napi::String>().Utf8Value());
  }
  auto done = std::make_shared<bool>(false);
  return RunAsync(
      info.Env(), {},
      [paths, done]() {
        bool all = true;
        for (const auto& path : paths) {
          const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
          if (fd < 0) {
            all = false;
            continue;
          }
#ifdef __linux__
          all = sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) == 0 &&
                posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0 && all;
#else
          all = false;
#endif
          close(fd);
        }
        *done = all;
      },
      [done](Napi::Env e) { return Napi::Boolean::New(e, *done); });
}

// The 2 MiB-aligned part of each array collapsed into 2 MiB pages, now
// (MADV_HUGEPAGE, then MADV_COLLAPSE, Linux 6.1+), on a libuv thread; the
// contents are unchanged. For measurements (bench/ra-search-layer.ts
// --huge-keys): a graph search at 1M keys reads ~31K random 256-byte key
// rows, each on its own 4 KiB page, a TLB miss and a page walk each; in 2 MiB
// pages it took 0.86-0.87 of the CPU a search on the 2-core VM
// (bench/results/ra-search-1048576-vm-r6.md). Nothing in the engine calls
// it (prefault says why its fills avoid 2 MiB pages). Resolves the bytes
// collapsed: 0 where the kernel cannot.
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
Napi::Value CollapseHugePagesJs(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsArray())
    throw Napi::TypeError::New(info.Env(), "collapseHugePages: an array of typed arrays");
  auto list = info[0].As<Napi::Array>();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  std::vector<Napi::Value> keep{list};
  for (uint32_t i = 0; i < list.Length(); ++i) {
    Napi::Value v = list.Get(i);
    if (!v.IsTypedArray()) throw Napi::TypeError::New(info.Env(), "collapseHugePages: an array of typed arrays");
    auto a = v.As<Napi::Uint8Array>();
    const uintptr_t begin = reinterpret_cast<uintptr_t>(a.Data());
    const uintptr_t from = (begin + kHuge - 1) & ~(kHuge - 1), to = (begin + a.ByteLength()) & ~(kHuge - 1);
    if (to > from) ranges.emplace_back(from, to);
  }
  auto bytes = std::make_shared<double>(0);
  return RunAsync(
      info.Env(), std::move(keep),
      [ranges, bytes]() {
        for (auto [from, to] : ranges)
          for (uintptr_t at = from; at < to; at += kHuge) {  // a page a call: the mmap lock, as prefault's steps
            void* p = reinterpret_cast<void*>(at);
            if (madvise(p, kHuge, MADV_HUGEPAGE) == 0 && madvise(p, kHuge, MADV_COLLAPSE) == 0) *bytes += double(kHuge);
          }
      },
      [bytes](Napi::Env e) { return Napi::Number::New(e, *bytes); });
}

}  // namespace

void InitConvert(Napi::Env env, Napi::Object exports) {
  exports.Set("convert", Napi::Function::New(env, ConvertJs));
  exports.Set("firstNonFinite", Napi::Function::New(env, FirstNonFiniteJs));
  exports.Set("prefault", Napi::Function::New(env, PrefaultJs));
  exports.Set("writeBackDrop", Napi::Function::New(env, WriteBackDropJs));
  exports.Set("collapseHugePages", Napi::Function::New(env, CollapseHugePagesJs));
}

}  // namespace kvr
