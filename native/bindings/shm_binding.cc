// shmMap({path, bytes}) -> ArrayBuffer | number
// shmUnmap(buffer) -> boolean
// shmMapped() -> {mappings, bytes}
//
// A decode stream's shared-memory segment (api/shm.ts): a file the client
// made in the server's --shm-dir, mapped MAP_SHARED, read and write, as an
// external ArrayBuffer. Two ways it is unmapped, whichever comes first:
// shmUnmap, called by the stream once no frame uses the segment (a stream
// that attaches again and again would otherwise hold every mapping until
// the collector ran), which detaches the buffer (every view of it reads
// as empty from then on, never as unmapped memory) and unmaps it at once;
// or the buffer's finalizer, when the garbage collector drops its last
// view. shmUnmap must not be called while native work reads the segment:
// the caller knows when none does (api/shm.ts counts its frames). The
// mapping's bytes are reported to V8 as external memory, which makes it
// collect sooner as segments pile up; shmMapped reports what is mapped
// now (the process's live mappings, tests and the stream's caps).
//
// On failure a status (ShmStatus below; addon/shm.ts words them), never a
// throw for a file's state: the arguments alone are checked by throwing,
// before any file is touched. The file must be a regular file owned by
// this process's user (a process that can truncate the file under the
// mapping makes the server's next read of it a SIGBUS; one of this user
// could kill the server anyway), opened without following a symbolic link
// in the last component (the directory is the server's own setting and
// the name carries no slash: api/shm.ts checks it).
#include <fcntl.h>
#include <napi.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

namespace kvr {
namespace {

// Kept in step with addon/shm.ts.
enum ShmStatus : int32_t {
  kNotFound = 1,     // no such file (ENOENT)
  kSymlink = 2,      // the last component is a symbolic link (ELOOP under O_NOFOLLOW)
  kNotRegular = 3,   // a directory, a device, a FIFO...
  kTooSmall = 4,     // the file is shorter than the bytes asked
  kNotOwner = 5,     // owned by another user
  kNoAccess = 6,     // EACCES/EPERM opening it read-write
  kMapFailed = 7,    // mmap failed (ENOMEM, say)
  kOpenFailed = 8,   // any other open or fstat failure
};

// The largest segment mapped: far above a batch's 1-2 MB, short of address-space games.
constexpr double kMaxBytes = 16.0 * (1ull << 30);

// One mapping. The finalizer deletes it; shmUnmap only marks it unmapped
// (the finalizer may run later, or within the detach itself).
struct Mapping {
  void* data;
  size_t bytes;
  bool unmapped;
};

// The live mappings by address (one process, any thread's environment).
std::mutex live_mutex;
std::unordered_map<void*, Mapping*> live;
size_t live_bytes = 0;

// Takes `m` out of the live set (the caller holds live_mutex).
void Forget(Mapping* m) {
  m->unmapped = true;
  live.erase(m->data);
  live_bytes -= m->bytes;
}

void Release(Napi::Env env, void* data, size_t bytes) {
  munmap(data, bytes);
  int64_t change = 0;
  napi_adjust_external_memory(env, -static_cast<int64_t>(bytes), &change);
}

void Finalize(Napi::Env env, void* data, Mapping* m) {
  bool unmap = false;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    if (!m->unmapped) {
      Forget(m);
      unmap = true;
    }
  }
  if (unmap) Release(env, data, m->bytes);
  delete m;
}

Napi::Value ShmMap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "Expected an argument object {path, bytes}");
  auto args = info[0].As<Napi::Object>();
  Napi::Value pathValue = args.Get("path"), bytesValue = args.Get("bytes");
  if (!pathValue.IsString()) throw Napi::TypeError::New(env, "Expected a string for path");
  if (!bytesValue.IsNumber()) throw Napi::TypeError::New(env, "Expected a number for bytes");
  std::string path = pathValue.As<Napi::String>().Utf8Value();
  double want = bytesValue.As<Napi::Number>().DoubleValue();
  if (path.empty() || path.size() > 4096 || path.find('\0') != std::string::npos)
    throw Napi::RangeError::New(env, "path must be 1 to 4096 bytes, no NUL");
  if (!(want >= 4) || want > kMaxBytes || want != static_cast<double>(static_cast<uint64_t>(want)) || static_cast<uint64_t>(want) % 4 != 0)
    throw Napi::RangeError::New(env, "bytes must be a positive multiple of 4, at most 16 GiB");
  const size_t bytes = static_cast<size_t>(want);

  // Anything but a regular file is refused before it is opened: opening a
  // device node or a FIFO read-write can have effects of its own
  // (--shm-dir may name any directory). fstat below checks the file opened.
  struct stat pre;
  if (lstat(path.c_str(), &pre) == 0 && !S_ISREG(pre.st_mode)) return Napi::Number::New(env, S_ISLNK(pre.st_mode) ? kSymlink : kNotRegular);
  int fd = open(path.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) {
    int e = errno;
    return Napi::Number::New(env, e == ENOENT ? kNotFound : e == ELOOP ? kSymlink : (e == EACCES || e == EPERM) ? kNoAccess : kOpenFailed);
  }
  struct stat st;
  int32_t status = 0;
  if (fstat(fd, &st) != 0) status = kOpenFailed;
  else if (!S_ISREG(st.st_mode)) status = kNotRegular;
  else if (st.st_uid != geteuid()) status = kNotOwner;
  else if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) < bytes) status = kTooSmall;
  void* data = MAP_FAILED;
  if (status == 0) {
    data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (data == MAP_FAILED) status = kMapFailed;
  }
  close(fd);  // the mapping holds the file
  if (status != 0) return Napi::Number::New(env, status);
  int64_t change = 0;
  napi_adjust_external_memory(env, static_cast<int64_t>(bytes), &change);
  auto* m = new Mapping{data, bytes, false};
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    live[data] = m;
    live_bytes += bytes;
  }
  return Napi::ArrayBuffer::New(env, data, bytes, Finalize, m);
}

// Detaches and unmaps a buffer shmMap made: true; false when it is not one
// still mapped (unmapped already, or another buffer).
Napi::Value ShmUnmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArrayBuffer()) throw Napi::TypeError::New(env, "Expected an ArrayBuffer");
  auto buf = info[0].As<Napi::ArrayBuffer>();
  if (buf.IsDetached()) return Napi::Boolean::New(env, false);
  void* data = buf.Data();
  Mapping* m = nullptr;
  size_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    auto it = live.find(data);
    if (it == live.end() || it->second->bytes != buf.ByteLength()) return Napi::Boolean::New(env, false);
    m = it->second;
    bytes = m->bytes;
    Forget(m);
  }
  // Detached first: no view reads the memory once it is unmapped. `m` is not
  // touched after the detach (the finalizer may have deleted it within).
  napi_status status = napi_detach_arraybuffer(env, buf);
  if (status != napi_ok) {
    std::lock_guard<std::mutex> lock(live_mutex);
    m->unmapped = false;
    live[data] = m;
    live_bytes += bytes;
    throw Napi::Error::New(env, "the segment's buffer could not be detached");
  }
  Release(env, data, bytes);
  return Napi::Boolean::New(env, true);
}

Napi::Value ShmMapped(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto out = Napi::Object::New(env);
  std::lock_guard<std::mutex> lock(live_mutex);
  out.Set("mappings", Napi::Number::New(env, static_cast<double>(live.size())));
  out.Set("bytes", Napi::Number::New(env, static_cast<double>(live_bytes)));
  return out;
}

}  // namespace

void InitShm(Napi::Env env, Napi::Object exports) {
  exports.Set("shmMap", Napi::Function::New(env, ShmMap, "shmMap"));
  exports.Set("shmUnmap", Napi::Function::New(env, ShmUnmap, "shmUnmap"));
  exports.Set("shmMapped", Napi::Function::New(env, ShmMapped, "shmMapped"));
}

}  // namespace kvr
