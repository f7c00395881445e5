// The native block pool (native/cuda/block_pool*.cu) driven by ops on stdin,
// one a line, over cuda_stub.cc's host stand-in for the CUDA runtime; after
// each op, the pool's counters (and what an attend's kernel would read) on
// stdout. test/native/pool-host.test.ts runs the same ops through PoolModel
// and compares the lines: the pool's host logic (page tables, eviction,
// pins, range tables, parking, the attend's tables) checked without a GPU.
//   U client hold n b.. p..   Ensure (indexed, classes p, hold)
//   W hold m [client n b.. p..] x m   EnsureMany over m clients
//   P client pinned n b..     Pin
//   Y pinned m [client n b..] x m   PinMany
//   H client first count cls  HoldRange -> " hold ID" (or " THROW")
//   S first count cls c..     HoldRanges over clients c.. -> " holds ID.." (all or none)
//   X id..                    Unhold (all or none)
//   R first last              ReleaseRange -> " freed N"
//   A id n [id n ...]         Attend over held ranges (one kv head) -> " read SLOTS"
//   O client n b..            Ensure (hold), Attend over the host table (two heads), unpin -> " old-path ok"
//   M id n s1 s2 s3           Attend over pieces [s1, hold, s2] and [s3] -> " read | ... | ..."
//   L                         -> " live D H allocs A frees F": the stand-in's device and pinned allocations
//   F                         -> " h2d N bytes B scatters S blocks K": the stand-in's host-to-device copies and
//                                scatter launches since the last F (not modelled: only in fixed sequences)
// Every client's K and V rows differ (block by block, word by word), and the
// bytes that land in the pool are checked against them: the slots an upload
// answers (hits too) once it returns (a W without hold: its last client's), the slots an attend over held ranges
// reads, and after every op the slots of every upload still held. A slot
// that holds other bytes appends " DATA client C block B slot S" to the
// line (which then differs from the model's), and " RACE" follows every op
// once a scatter launch named a slot twice; the count of blocks checked
// goes to stderr at the end ("checked N").
// With a second argument k, the pool is made with the stand-in's allocation
// k failing, then destroyed: prints "ctor ok|THROW live D H" (no ops).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/block_pool.h"

extern std::vector<std::vector<int32_t>> gRead;
extern long gLiveDev, gLiveHost, gAllocs, gFrees, gFailAt;
extern long gH2D, gH2DBytes, gScatter, gScattered, gScatterRaces;
extern const uint16_t *gKPool, *gVPool;
using namespace kvr::cuda;

namespace {

constexpr int kBlocks = 96;         // blocks of a client's rows (ids below it)
constexpr size_t kWords = 64 * 64;  // words of a K (or V) block: 64 tokens x headDim 64

// A client's K and V rows: word w of block b of client c is its own, K's and V's apart.
struct Rows {
  std::vector<uint16_t> k, v;
  explicit Rows(int64_t c) : k(kBlocks * kWords), v(kBlocks * kWords) {
    for (size_t i = 0; i < k.size(); ++i) {
      const uint32_t b = uint32_t(i / kWords), w = uint32_t(i % kWords), id = uint32_t(c) * 131 + b;
      k[i] = uint16_t((id * 2) ^ (w * 40503u));
      v[i] = uint16_t((id * 2 + 1) ^ (w * 40503u));
    }
  }
};
std::map<int64_t, Rows> rows;
const Rows& RowsOf(int64_t c) { return rows.try_emplace(c, c).first->second; }

long checked = 0;
// " DATA ..." when slot s does not hold client c's block b (K and V), else "".
std::string Check(int64_t c, int32_t b, int32_t s) {
  ++checked;
  const Rows& r = RowsOf(c);
  if (!gKPool || std::memcmp(gKPool + size_t(s) * kWords, r.k.data() + size_t(b) * kWords, kWords * 2) ||
      std::memcmp(gVPool + size_t(s) * kWords, r.v.data() + size_t(b) * kWords, kWords * 2))
    return " DATA client " + std::to_string(c) + " block " + std::to_string(b) + " slot " + std::to_string(s);
  return "";
}
std::string CheckAll(int64_t c, const std::vector<int32_t>& b, const int32_t* s) {
  for (size_t i = 0; i < b.size(); ++i)
    if (std::string e = Check(c, b[i], s[i]); !e.empty()) return e;
  return "";
}

// An upload held now (U or W with hold): its slots keep its blocks until it is unpinned.
struct Held {
  int64_t client;
  std::vector<int32_t> blocks, slots;
};
std::vector<Held> held;
void Unpinned(int64_t c, const std::vector<int32_t>& b) {
  for (auto h = held.begin(); h != held.end(); ++h)
    if (h->client == c && h->blocks == b) {
      held.erase(h);
      return;
    }
}

}  // namespace

int main(int argc, char** argv) {
  const long slots = argc > 1 ? atol(argv[1]) : 40;
  PoolConfig c;
  c.budgetBytes = slots * 64 * 64 * 2 * 2;
  c.blockSize = 64;
  c.headDim = 64;
  // 4 chunks of 1 MiB: 63 blocks of 16 KiB a chunk, so a flush can be past the inline copy's 256 KiB (ParallelFor).
  c.stagingBytes = 4 << 20;
  if (argc > 2) {
    gFailAt = atol(argv[2]);
    const char* what = "ok";
    try {
      BlockPool pool(c);
    } catch (const std::exception&) {
      what = "THROW";
    }
    printf("ctor %s live %ld %ld\n", what, gLiveDev, gLiveHost);
    return 0;
  }
  BlockPool pool(c);
  std::map<int64_t, std::pair<int64_t, int32_t>> holdOf;  // hold id -> its client and first block
  long h2d = 0, h2dBytes = 0, scatters = 0, scattered = 0;  // at the last F
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string op;
    in >> op;
    std::string out;
    auto attend = [&](AttendArgs& a, int heads) {
      static std::vector<float> q(256), o(256), l(4);
      a.qHeads = heads;
      a.kvHeads = heads;
      a.q = q.data();
      a.out = o.data();
      a.lse = l.data();
      pool.Attend(a);
    };
    // n block ids (and with classes, n classes) from the line.
    auto blocksAt = [&](int n, std::vector<uint8_t>* classes) {
      std::vector<int32_t> b(n);
      for (auto& x : b) in >> x;
      if (classes) {
        classes->resize(size_t(n));
        for (auto& x : *classes) {
          int y;
          in >> y;
          x = uint8_t(y);
        }
      }
      return b;
    };
    try {
      if (op == "U") {
        int64_t client;
        int hold, n;
        in >> client >> hold >> n;
        std::vector<uint8_t> pr;
        const std::vector<int32_t> b = blocksAt(n, &pr);
        std::vector<int32_t> s(n);
        BlockPool::EnsureOptions o;
        o.priorities = pr.data();
        o.source = BlockPool::Source::kIndexed;
        o.hold = hold;
        const Rows& r = RowsOf(client);
        pool.Ensure(client, b.data(), n, r.k.data(), r.v.data(), s.data(), o);
        out = CheckAll(client, b, s.data());
        if (hold) held.push_back({client, b, s});
      } else if (op == "W") {
        int hold, m;
        in >> hold >> m;
        std::vector<BlockPool::ClientBlocks> items(m);
        std::vector<std::vector<int32_t>> b(m);
        std::vector<std::vector<uint8_t>> pr(m);
        size_t total = 0;
        for (int i = 0; i < m; ++i) {
          int n;
          in >> items[i].client >> n;
          b[i] = blocksAt(n, &pr[i]);
          const Rows& r = RowsOf(items[i].client);
          items[i].blocks = b[i].data();
          items[i].n = n;
          items[i].k = r.k.data();
          items[i].v = r.v.data();
          items[i].priorities = pr[i].data();
          total += size_t(n);
        }
        std::vector<int32_t> s(total);
        BlockPool::EnsureOptions o;
        o.hold = hold;
        pool.EnsureMany(items.data(), m, o, s.data());
        size_t at = 0;
        for (int i = 0; i < m; ++i) {
          // Without hold, an item's slots may go to the next item's misses (as with a call each): the last one's stay.
          if (out.empty() && (hold || i == m - 1)) out = CheckAll(items[i].client, b[i], s.data() + at);
          if (hold) held.push_back({items[i].client, b[i], std::vector<int32_t>(s.begin() + at, s.begin() + at + b[i].size())});
          at += b[i].size();
        }
      } else if (op == "P") {
        int64_t client;
        int pinned, n;
        in >> client >> pinned >> n;
        const std::vector<int32_t> b = blocksAt(n, nullptr);
        pool.Pin(client, b.data(), n, pinned);
        if (!pinned) Unpinned(client, b);
      } else if (op == "Y") {
        int pinned, m;
        in >> pinned >> m;
        std::vector<BlockPool::ClientBlocks> items(m);
        std::vector<std::vector<int32_t>> b(m);
        for (int i = 0; i < m; ++i) {
          int n;
          in >> items[i].client >> n;
          b[i] = blocksAt(n, nullptr);
          items[i].blocks = b[i].data();
          items[i].n = n;
        }
        pool.PinMany(items.data(), m, pinned);
        for (int i = 0; i < m && !pinned; ++i) Unpinned(items[i].client, b[i]);
      } else if (op == "H") {
        int64_t client;
        int first, count, cls;
        in >> client >> first >> count >> cls;
        const Rows& r = RowsOf(client);
        const int64_t id = pool.HoldRange(client, first, count, r.k.data(), r.v.data(), cls);
        holdOf[id] = {client, first};
        out = " hold " + std::to_string(id);
      } else if (op == "S") {
        int first, count, cls;
        in >> first >> count >> cls;
        std::vector<int64_t> clients, ids;
        int64_t cl;
        while (in >> cl) clients.push_back(cl);
        ids.resize(clients.size());
        std::vector<const uint16_t*> k, v;
        for (int64_t x : clients) k.push_back(RowsOf(x).k.data()), v.push_back(RowsOf(x).v.data());
        pool.HoldRanges(clients.data(), int(clients.size()), first, count, k.data(), v.data(), cls, ids.data());
        out = " holds";
        for (size_t i = 0; i < ids.size(); ++i) {
          holdOf[ids[i]] = {clients[i], first};
          out += " " + std::to_string(ids[i]);
        }
      } else if (op == "X") {
        std::vector<int64_t> ids;
        int64_t h;
        while (in >> h) ids.push_back(h);
        pool.Unhold(ids.data(), int(ids.size()));
      } else if (op == "R") {
        int64_t a, b;
        in >> a >> b;
        out = " freed " + std::to_string(pool.ReleaseRange(a, b));
        for (auto h = held.begin(); h != held.end();) h = h->client >= a && h->client < b ? held.erase(h) : h + 1;
      } else if (op == "A") {
        AttendArgs a;
        a.pieces.resize(1);
        int64_t total = 0, h, n;
        while (in >> h >> n) {
          TablePiece p;
          p.hold = h;
          p.blocks = n;
          a.pieces[0].push_back(p);
          total += n;
        }
        a.validTokens = {total * 64};
        attend(a, 1);
        out = " read";
        for (int32_t s : gRead[0]) out += " " + std::to_string(s);
        // Piece by piece, the slots read hold the hold's blocks from its first on.
        size_t at = 0;
        for (const TablePiece& p : a.pieces[0]) {
          const auto [client, first] = holdOf.at(p.hold);
          for (int64_t j = 0; j < p.blocks && out.find(" DATA") == std::string::npos; ++j)
            out += Check(client, first + int32_t(j), gRead[0][at + size_t(j)]);
          at += size_t(p.blocks);
        }
      } else if (op == "O") {
        int64_t client;
        int n;
        in >> client >> n;
        std::vector<int32_t> b(n), sl(n);
        for (auto& x : b) in >> x;
        BlockPool::EnsureOptions o;
        o.source = BlockPool::Source::kIndexed;
        o.hold = true;
        const Rows& r = RowsOf(client);
        pool.Ensure(client, b.data(), n, r.k.data(), r.v.data(), sl.data(), o);
        AttendArgs a;
        const std::vector<int32_t> rev(sl.rbegin(), sl.rend());
        a.tables = {sl, rev};
        a.validTokens = {int64_t(n) * 64 - 5, int64_t(n) * 64};
        attend(a, 2);
        pool.Pin(client, b.data(), n, false);
        out = gRead[0] == sl && gRead[1] == rev ? " old-path ok" : " old-path WRONG";
      } else if (op == "L") {
        out = " live " + std::to_string(gLiveDev) + " " + std::to_string(gLiveHost) + " allocs " + std::to_string(gAllocs) +
              " frees " + std::to_string(gFrees);
      } else if (op == "F") {
        out = " h2d " + std::to_string(gH2D - h2d) + " bytes " + std::to_string(gH2DBytes - h2dBytes) + " scatters " +
              std::to_string(gScatter - scatters) + " blocks " + std::to_string(gScattered - scattered);
        h2d = gH2D, h2dBytes = gH2DBytes, scatters = gScatter, scattered = gScattered;
      } else if (op == "M") {
        int64_t h, nb;
        int32_t s1, s2, s3;
        in >> h >> nb >> s1 >> s2 >> s3;
        AttendArgs a;
        TablePiece p1, ph, p2, p3;
        p1.slots = {s1};
        ph.hold = h;
        ph.blocks = nb;
        p2.slots = {s2};
        p3.slots = {s3};
        a.pieces = {{p1, ph, p2}, {p3}};
        a.validTokens = {(nb + 2) * 64, 64};
        attend(a, 2);
        out = " read";
        for (auto& r : gRead) {
          out += " |";
          for (int32_t s : r) out += " " + std::to_string(s);
        }
      }
    } catch (const std::exception&) {
      out = " THROW";
    }
    // What every held upload was given still holds its blocks (a slot taken, or written over, under a hold fails here).
    for (size_t i = 0; i < held.size() && out.find(" DATA") == std::string::npos; ++i)
      out += CheckAll(held[i].client, held[i].blocks, held[i].slots.data());
    if (gScatterRaces > 0) out += " RACE";
    const PoolStats s = pool.Stats();
    printf("%s used %ld pinned %ld hits %ld misses %ld evictions %ld rangeHeld %ld reuses %ld patched %ld%s\n",
           op.c_str(), long(s.used), long(s.pinned), long(s.hits), long(s.misses), long(s.evictions), long(s.rangeHeld),
           long(s.rangeReuses), long(s.rangePatched), out.c_str());
  }
  fprintf(stderr, "checked %ld\n", checked);
}
