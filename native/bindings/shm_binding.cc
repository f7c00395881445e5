// shmMap({path, bytes}) -> ArrayBuffer | number
//
// A decode stream's shared-memory segment (api/shm.ts): a file the client
// made in the server's --shm-dir, mapped MAP_SHARED, read and write, as an
// external ArrayBuffer whose finalizer unmaps it. The unmap waits for the
// garbage collector: every view of the segment (a request's q held by a
// step still running, say) keeps the buffer, and so the mapping, alive,
// so nothing reads unmapped memory. The mapping's bytes are reported to V8
// as external memory, which makes it collect sooner as segments pile up.
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
#include <string>

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

void Unmap(Napi::Env env, void* data, size_t* bytes) {
  munmap(data, *bytes);
  int64_t change = 0;
  napi_adjust_external_memory(env, -static_cast<int64_t>(*bytes), &change);
  delete bytes;
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
  return Napi::ArrayBuffer::New(env, data, bytes, Unmap, new size_t(bytes));
}

}  // namespace

void InitShm(Napi::Env env, Napi::Object exports) {
  exports.Set("shmMap", Napi::Function::New(env, ShmMap, "shmMap"));
}

}  // namespace kvr
