// blockReps({keys: Uint16Array [tokens, headDim], dtype, tokens, headDim, blockSize, reps, iterations,
//            centroids: Uint16Array [blocks*reps, headDim], radii: Float32Array [blocks*reps],
//            counts: Int32Array [blocks*reps]}) -> Promise<void>   (native/kernels/block_reps.h)
#include <napi.h>

#include "common/binding_args.h"
#include "kernels/block_reps.h"

namespace kvr {
namespace {

Napi::Value BlockRepsJs(const Napi::CallbackInfo& info) {
  Napi::Object o = ArgObject(info);
  BlockRepsProblem p;
  p.tokens = Int(o, "tokens", 0, int64_t(1) << 31);
  p.headDim = int(Int(o, "headDim", 1, 4096));
  p.dtype = KeyDtype(o);
  p.blockSize = int(Int(o, "blockSize", 1, 1 << 16));
  p.reps = int(Int(o, "reps", 1, 64));
  p.iterations = int(Int(o, "iterations", 0, 100));
  const size_t slots = size_t((p.tokens + p.blockSize - 1) / p.blockSize) * size_t(p.reps);
  auto keys = TypedAt<uint16_t>(o, "keys", size_t(p.tokens) * size_t(p.headDim));
  auto centroids = TypedAt<uint16_t>(o, "centroids", slots * size_t(p.headDim));
  auto radii = TypedAt<float>(o, "radii", slots);
  auto counts = TypedAt<int32_t>(o, "counts", slots);
  p.keys = keys.Data();
  p.centroids = centroids.Data();
  p.radii = radii.Data();
  p.counts = counts.Data();
  return RunAsync(info.Env(), {keys, centroids, radii, counts}, [p]() { BlockReps(p); }, [](Napi::Env e) { return e.Undefined(); });
}

}  // namespace

void InitBlockReps(Napi::Env env, Napi::Object exports) { exports.Set("blockReps", Napi::Function::New(env, BlockRepsJs)); }

}  // namespace kvr
