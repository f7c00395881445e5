// Registers the exports of each binding file; nothing else lives here.
#include <napi.h>

#include "common/thread_pool.h"

namespace kvr {
void InitConvert(Napi::Env env, Napi::Object exports);
void InitOutlierScores(Napi::Env env, Napi::Object exports);
void InitChecksum(Napi::Env env, Napi::Object exports);
void InitAttention(Napi::Env env, Napi::Object exports);
void InitTopk(Napi::Env env, Napi::Object exports);
void InitAttentionMass(Napi::Env env, Napi::Object exports);
void InitClusterEstimate(Napi::Env env, Napi::Object exports);
void InitClusterRank(Napi::Env env, Napi::Object exports);
void InitClusterSummary(Napi::Env env, Napi::Object exports);
void InitWaveBuild(Napi::Env env, Napi::Object exports);
void InitRaGraph(Napi::Env env, Napi::Object exports);
void InitRaScan(Napi::Env env, Napi::Object exports);
void InitFaiss(Napi::Env env, Napi::Object exports);
void InitCuda(Napi::Env env, Napi::Object exports);
void InitBlockScores(Napi::Env env, Napi::Object exports);
void InitBlockReps(Napi::Env env, Napi::Object exports);
void InitBlockChoose(Napi::Env env, Napi::Object exports);
void InitWaveGpu(Napi::Env env, Napi::Object exports);
void InitSocketRead(Napi::Env env, Napi::Object exports);
void InitCopy(Napi::Env env, Napi::Object exports);
void InitShm(Napi::Env env, Napi::Object exports);
}  // namespace kvr

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  kvr::InitConvert(env, exports);
  kvr::InitOutlierScores(env, exports);
  kvr::InitChecksum(env, exports);
  kvr::InitAttention(env, exports);
  kvr::InitTopk(env, exports);
  kvr::InitAttentionMass(env, exports);
  kvr::InitClusterEstimate(env, exports);
  kvr::InitClusterRank(env, exports);
  kvr::InitClusterSummary(env, exports);
  kvr::InitWaveBuild(env, exports);
  kvr::InitRaGraph(env, exports);
  kvr::InitRaScan(env, exports);
  kvr::InitFaiss(env, exports);
  kvr::InitCuda(env, exports);
  kvr::InitBlockScores(env, exports);
  kvr::InitBlockReps(env, exports);
  kvr::InitBlockChoose(env, exports);
  kvr::InitWaveGpu(env, exports);
  kvr::InitSocketRead(env, exports);
  kvr::InitCopy(env, exports);
  kvr::InitShm(env, exports);
  exports.Set("threads", Napi::Number::New(env, double(kvr::ThreadPool::Get().Threads())));
  return exports;
}

NODE_API_MODULE(kvrecall, Init)
