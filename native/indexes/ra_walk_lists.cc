// RaWalkLists (ra_walk_lists.h) and RaGraph's cache of them.
#include "indexes/ra_walk_lists.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>

#include <sys/mman.h>

#include "indexes/ra_graph.h"

namespace kvr {

void RaWalkLists::Free::operator()(int32_t* p) const { std::free(p); }

std::unique_ptr<RaWalkLists> RaWalkLists::Build(const int64_t* off, const int32_t* nbr, int64_t n) {
  size_t extra = 0;
  for (int64_t u = 0; u < n; ++u) {
    const int64_t c = off[u + 1] - off[u];
    if (c >= (int64_t(1) << kCountBits)) return nullptr;
    extra += size_t(std::max<int64_t>(0, c - kInline));
  }
  if (extra >= (size_t(1) << (31 - kCountBits))) return nullptr;
  auto w = std::make_unique<RaWalkLists>();
  constexpr size_t kHuge = size_t(2) << 20;
  w->bytes = size_t(n) * kSlot * sizeof(int32_t);
  // 2 MB pages, as the codes (ra_key_codes.h), where the rounding wastes at most an eighth.
  const bool huge = w->bytes >= 8 * kHuge;
  const size_t align = huge ? kHuge : 64, total = (std::max<size_t>(w->bytes, 1) + align - 1) / align * align;
  w->slots.reset(static_cast<int32_t*>(std::aligned_alloc(align, total)));
  if (!w->slots) throw std::bad_alloc();
  if (huge) madvise(w->slots.get(), total, MADV_HUGEPAGE);
  std::memset(w->slots.get(), 0, total);
  w->overflow.reserve(extra);
  for (int64_t u = 0; u < n; ++u) {
    int32_t* s = w->slots.get() + size_t(u) * kSlot;
    const int64_t c = off[u + 1] - off[u];
    s[0] = int32_t(uint32_t(c) | uint32_t(w->overflow.size()) << kCountBits);
    for (int64_t i = 0; i < c; ++i) {
      if (i < kInline) s[1 + i] = nbr[off[u] + i];
      else w->overflow.push_back(nbr[off[u] + i]);
    }
  }
  return w;
}

std::shared_ptr<const RaWalkLists> RaGraph::WalkListsFor() const {
  std::lock_guard<std::mutex> hold(lists_->lock);
  if (!lists_->tried) {
    // KVR_RA_WALK_LISTS=csr: the walk on the CSR (for A/B and the tests'
    // comparison of the two), read when a graph makes its slots.
    const char* env = std::getenv("KVR_RA_WALK_LISTS");
    if (!(env && std::string(env) == "csr")) lists_->lists = RaWalkLists::Build(offsets_.data(), neighbors_.data(), n_);
    lists_->tried = true;
  }
  return lists_->lists;
}

size_t RaGraph::WalkListBytes() const {
  std::lock_guard<std::mutex> hold(lists_->lock);
  return lists_->lists ? lists_->lists->Bytes() : 0;
}

}  // namespace kvr
