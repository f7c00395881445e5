// readSocket({fd, dst: Uint8Array, mask: Uint8Array(4), phase, cancel: Int32Array(1), progressMs, ahead?: Uint8Array})
//   -> Promise<number> (bytes read: dst.byteLength, plus those read into `ahead`), rejected with why on
//      EOF, a socket error, no byte for progressMs, or cancel[0] set to nonzero.
//
// A large WebSocket message (a document's K/V upload: 16 MiB) read through
// node's socket stream arrives as a fresh 64 KiB buffer per read, each
// allocated, copied once more into the message and collected: ~0.7 s of
// the event loop per GB on the 2-core VM, where reads into one reused
// buffer cost ~0.17 s (bench/results/preload-vm.md). This reads the rest of
// such a message straight from the socket into its buffer, on a thread of
// its own (a slow peer may hold it for up to progressMs; the libuv pool
// stays free), unmasking as it goes. The caller stops node's reading of the
// socket first and starts it again once this settles. The thread reads
// through a dup of the descriptor: should node close the socket meanwhile,
// the descriptor's number cannot be reused under the thread, which notices
// cancel[0] within kPollMs and returns.
//
// With `ahead`, once dst is full the thread reads what has already come
// after it (one read that does not wait, as is: not unmasked) into ahead:
// the next message's header and first bytes. The caller parses them as it
// hands this message on, and so starts reading the next large one at once;
// without them it waited for the event loop to come round to the socket,
// behind whatever work this message set off there (on the 16-core host a
// preload's socket went unread ~3.4 ms per 16 MiB upload, against 6.1 ms
// of reading: bench/results/preload-h200-shards.md).
#include <fcntl.h>
#include <napi.h>
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <system_error>
#include <thread>

#include "common/binding_args.h"

namespace kvr {
namespace {

constexpr int kPollMs = 50;

struct ReadOp {
  int fd = -1;
  uint8_t* dst = nullptr;
  size_t length = 0;
  uint8_t mask[4] = {0, 0, 0, 0};
  size_t phase = 0;
  int32_t* cancel = nullptr;
  int progressMs = 30000;
  size_t done = 0;
  uint8_t* ahead = nullptr;
  size_t aheadLength = 0, aheadDone = 0;
  std::string error;
  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> keepDst, keepCancel, keepAhead;
  Napi::ThreadSafeFunction tsfn;
  explicit ReadOp(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

void Unmask(uint8_t* p, size_t n, const uint8_t mask[4], size_t phase) {
  if ((mask[0] | mask[1] | mask[2] | mask[3]) == 0) return;
  for (size_t i = 0; i < n; ++i) p[i] ^= mask[(phase + i) & 3];
}

void ReadLoop(ReadOp* op) {
  using Clock = std::chrono::steady_clock;
  auto last = Clock::now();
  while (op->done < op->length) {
    if (__atomic_load_n(op->cancel, __ATOMIC_ACQUIRE) != 0) {
      op->error = "cancelled";
      return;
    }
    const ssize_t n = read(op->fd, op->dst + op->done, op->length - op->done);
    if (n > 0) {
      Unmask(op->dst + op->done, size_t(n), op->mask, op->phase + op->done);
      op->done += size_t(n);
      last = Clock::now();
      continue;
    }
    if (n == 0) {
      op->error = "the peer closed the connection mid-message";
      return;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      op->error = std::string("read: ") + std::strerror(errno);
      return;
    }
    if (Clock::now() - last > std::chrono::milliseconds(op->progressMs)) {
      op->error = "timeout";
      return;
    }
    pollfd p{op->fd, POLLIN, 0};
    if (poll(&p, 1, kPollMs) < 0 && errno != EINTR) {
      op->error = std::string("poll: ") + std::strerror(errno);
      return;
    }
  }
  // The descriptor does not block (node's): nothing there yet, an end or an error is left for node to find.
  while (op->aheadLength > 0) {
    const ssize_t n = read(op->fd, op->ahead, op->aheadLength);
    if (n > 0) op->aheadDone = size_t(n);
    if (n >= 0 || errno != EINTR) break;
  }
}

Napi::Value ReadSocketJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = ArgObject(info);
  const int fd = int(Int(o, "fd", 0, 1 << 30));
  auto dst = Typed<uint8_t>(o.Get("dst"), "dst");
  auto mask = Typed<uint8_t>(o.Get("mask"), "mask", 4);
  auto cancel = Typed<int32_t>(o.Get("cancel"), "cancel", 1);
  // Every argument checked before anything is owned: a throw below this leaks nothing.
  const size_t phase = size_t(Int(o, "phase", 0, int64_t(1) << 52));
  const int progressMs = int(Int(o, "progressMs", 1, 1 << 30));
  auto ahead = OptTypedAt<uint8_t>(o, "ahead");
  auto op = std::make_unique<ReadOp>(env);
  if (ahead) {
    op->ahead = ahead->Data();
    op->aheadLength = ahead->ByteLength();
    op->keepAhead = Napi::Persistent(Napi::Value(*ahead));
  }
  op->dst = dst.Data();
  op->length = dst.ByteLength();
  std::memcpy(op->mask, mask.Data(), 4);
  op->phase = phase;
  op->cancel = cancel.Data();
  op->progressMs = progressMs;
  op->keepDst = Napi::Persistent(Napi::Value(dst));
  op->keepCancel = Napi::Persistent(Napi::Value(cancel));
  Napi::Promise promise = op->deferred.Promise();
  // Close-on-exec: a child spawned meanwhile must not hold the connection open.
  op->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (op->fd < 0) {
    op->deferred.Reject(Napi::Error::New(env, std::string("readSocket: dup: ") + std::strerror(errno)).Value());
    return promise;
  }
  op->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "readSocket", 0, 1);
  ReadOp* raw = op.get();
  try {
    std::thread([raw]() {
      ReadLoop(raw);
      close(raw->fd);
      raw->tsfn.BlockingCall(raw, [](Napi::Env env, Napi::Function, ReadOp* op) {
        if (op->error.empty()) op->deferred.Resolve(Napi::Number::New(env, double(op->done + op->aheadDone)));
        else op->deferred.Reject(Napi::Error::New(env, "readSocket: " + op->error).Value());
        op->tsfn.Release();
        delete op;
      });
    }).detach();
  } catch (const std::system_error& e) {
    // No thread (the process is out of them): the read fails, nothing kept.
    close(op->fd);
    op->tsfn.Release();
    op->deferred.Reject(Napi::Error::New(env, std::string("readSocket: no thread: ") + e.what()).Value());
    return promise;
  }
  op.release();  // the thread owns it now
  return promise;
}

}  // namespace

void InitSocketRead(Napi::Env env, Napi::Object exports) {
  exports.Set("readSocket", Napi::Function::New(env, ReadSocketJs));
}

}  // namespace kvr
