// RaGraph::Serialize / Deserialize: the versioned, checksummed blob of
// ra_graph.h (little-endian; this code assumes a little-endian host).
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/checksum.h"
#include "indexes/ra_graph.h"

namespace kvr {
namespace {

constexpr char kMagic[8] = {'K', 'V', 'R', 'A', 'G', 'R', 'P', 'H'};
// Version 4: key-key edges (the header records keyNeighbors). Version 3
// (positional edges and entry points per stretch of positions, the header
// records `positional`), 2 (the trailing checksum became common/checksum.h's
// Checksum64) and 1 are stale: rebuilt, not read.
constexpr uint32_t kVersion = 4;

#pragma pack(push, 1)
struct Header {
  char magic[8];
  uint32_t version;
  uint32_t headerBytes;
  int64_t n;
  int32_t d;
  int32_t degree;
  int32_t kBuild;
  int32_t entryCount;
  int64_t maxQueries;
  uint64_t seed;
  int64_t queriesUsed;
  int64_t edgeCount;
  int32_t positional;
  int32_t keyNeighbors;
};
#pragma pack(pop)

[[noreturn]] void Corrupt(const std::string& why) { throw std::runtime_error("ra-graph blob is corrupt: " + why); }

}  // namespace

std::vector<uint8_t> RaGraph::Serialize() const {
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = kVersion;
  h.headerBytes = sizeof(Header);
  h.n = n_;
  h.d = d_;
  h.degree = params_.degree;
  h.kBuild = params_.kBuild;
  h.entryCount = int32_t(entries_.size());
  h.maxQueries = params_.maxQueries;
  h.seed = params_.seed;
  h.queriesUsed = queriesUsed_;
  h.edgeCount = int64_t(neighbors_.size());
  h.positional = params_.positional;
  h.keyNeighbors = params_.keyNeighbors;
  const size_t size = sizeof(Header) + offsets_.size() * 8 + neighbors_.size() * 4 + entries_.size() * 4 + 8;
  std::vector<uint8_t> out(size);
  uint8_t* p = out.data();
  std::memcpy(p, &h, sizeof h);
  p += sizeof h;
  std::memcpy(p, offsets_.data(), offsets_.size() * 8);
  p += offsets_.size() * 8;
  std::memcpy(p, neighbors_.data(), neighbors_.size() * 4);
  p += neighbors_.size() * 4;
  std::memcpy(p, entries_.data(), entries_.size() * 4);
  p += entries_.size() * 4;
  const uint64_t sum = Checksum64(out.data(), size - 8);
  std::memcpy(p, &sum, 8);
  return out;
}

RaGraph RaGraph::Deserialize(const uint8_t* data, size_t size) {
  {
    const uint16_t probe = 1;
    uint8_t lo;
    std::memcpy(&lo, &probe, 1);
    if (lo != 1) throw std::runtime_error("ra-graph: big-endian hosts are not supported");
  }
  if (data == nullptr || size < 12) Corrupt("too short");
  if (std::memcmp(data, kMagic, 8) != 0) Corrupt("bad magic");
  uint32_t version;
  std::memcpy(&version, data + 8, 4);
  if (version < kVersion)
    throw std::runtime_error("ra-graph blob version " + std::to_string(version) + " is stale (this build reads version " +
                             std::to_string(kVersion) + "): rebuild the index from the keys");
  if (version != kVersion) Corrupt("unsupported version " + std::to_string(version));
  if (size < sizeof(Header) + 8) Corrupt("too short");
  Header h;
  std::memcpy(&h, data, sizeof h);
  if (h.headerBytes != sizeof(Header)) Corrupt("bad header size");
  uint64_t sum;
  std::memcpy(&sum, data + size - 8, 8);
  if (sum != Checksum64(data, size - 8)) Corrupt("checksum mismatch");
  const uint64_t body = uint64_t(size) - sizeof(Header) - 8;
  if (h.n < 0 || h.n > int64_t(std::numeric_limits<int32_t>::max())) Corrupt("bad token count");
  if (h.d < 1 || h.d > (1 << 16)) Corrupt("bad head dim");
  if (h.degree < 1 || h.kBuild < 1 || h.maxQueries < 1 || h.queriesUsed < 0 || h.positional < 0 || h.positional > 64 ||
      h.keyNeighbors < 0 || h.keyNeighbors > 1024)
    Corrupt("bad parameters");
  if (h.entryCount < 0 || h.entryCount > h.n || (h.n > 0 && h.entryCount == 0)) Corrupt("bad entry count");
  if (h.edgeCount < 0 || uint64_t(h.edgeCount) > body / 4) Corrupt("bad edge count");
  const uint64_t need = (uint64_t(h.n) + 1) * 8 + uint64_t(h.edgeCount) * 4 + uint64_t(h.entryCount) * 4;
  if (need != body) Corrupt("size mismatch");
  RaGraph g;
  g.n_ = h.n;
  g.d_ = h.d;
  g.params_.degree = h.degree;
  g.params_.kBuild = h.kBuild;
  g.params_.maxQueries = h.maxQueries;
  g.params_.seed = h.seed;
  g.params_.positional = h.positional;
  g.params_.keyNeighbors = h.keyNeighbors;
  g.queriesUsed_ = h.queriesUsed;
  const uint8_t* p = data + sizeof(Header);
  g.offsets_.resize(size_t(h.n) + 1);
  std::memcpy(g.offsets_.data(), p, g.offsets_.size() * 8);
  p += g.offsets_.size() * 8;
  g.neighbors_.resize(size_t(h.edgeCount));
  std::memcpy(g.neighbors_.data(), p, g.neighbors_.size() * 4);
  p += g.neighbors_.size() * 4;
  g.entries_.resize(size_t(h.entryCount));
  std::memcpy(g.entries_.data(), p, g.entries_.size() * 4);
  if (g.offsets_[0] != 0 || g.offsets_[size_t(h.n)] != h.edgeCount) Corrupt("bad offsets");
  for (int64_t u = 0; u < h.n; ++u)
    if (g.offsets_[size_t(u) + 1] < g.offsets_[size_t(u)]) Corrupt("offsets decrease");
  for (int32_t v : g.neighbors_)
    if (v < 0 || v >= h.n) Corrupt("neighbour id out of range");
  for (int32_t e : g.entries_)
    if (e < 0 || e >= h.n) Corrupt("entry id out of range");
  return g;
}

}  // namespace kvr
