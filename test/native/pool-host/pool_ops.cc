// The native block pool (native/cuda/block_pool*.cu) driven by ops on stdin,
// one a line, over cuda_stub.cc's host stand-in for the CUDA runtime; after
// each op, the pool's counters (and what an attend's kernel would read) on
// stdout. test/native/pool-host.test.ts runs the same ops through PoolModel
// and compares the lines: the pool's host logic (page tables, eviction,
// pins, range tables, parking, the attend's tables) checked without a GPU.
//   U client hold n b.. p..   Ensure (indexed, classes p, hold)
//   P client pinned n b..     Pin
//   H client first count cls  HoldRange -> " hold ID" (or " THROW")
//   S first count cls c..     HoldRanges over clients c.. -> " holds ID.." (all or none)
//   X id..                    Unhold (all or none)
//   R first last              ReleaseRange -> " freed N"
//   A id n [id n ...]         Attend over held ranges (one kv head) -> " read SLOTS"
//   O client n b..            Ensure (hold), Attend over the host table (two heads), unpin -> " old-path ok"
//   M id n s1 s2 s3           Attend over pieces [s1, hold, s2] and [s3] -> " read | ... | ..."
//   L                         -> " live D H allocs A frees F": the stand-in's device and pinned allocations
// With a second argument k, the pool is made with the stand-in's allocation
// k failing, then destroyed: prints "ctor ok|THROW live D H" (no ops).
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/block_pool.h"

extern std::vector<std::vector<int32_t>> gRead;
extern long gLiveDev, gLiveHost, gAllocs, gFrees, gFailAt;
using namespace kvr::cuda;

int main(int argc, char** argv) {
  const long slots = argc > 1 ? atol(argv[1]) : 40;
  PoolConfig c;
  c.budgetBytes = slots * 64 * 64 * 2 * 2;
  c.blockSize = 64;
  c.headDim = 64;
  c.stagingBytes = 1 << 20;
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
  std::vector<uint16_t> kv(64 * 64 * 64);  // 64 blocks of a head's rows: the data is not read back
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
    try {
      if (op == "U") {
        int64_t client;
        int hold, n;
        in >> client >> hold >> n;
        std::vector<int32_t> b(n), s(n);
        std::vector<uint8_t> pr(n);
        for (auto& x : b) in >> x;
        for (auto& x : pr) {
          int y;
          in >> y;
          x = uint8_t(y);
        }
        BlockPool::EnsureOptions o;
        o.priorities = pr.data();
        o.source = BlockPool::Source::kIndexed;
        o.hold = hold;
        pool.Ensure(client, b.data(), n, kv.data(), kv.data(), s.data(), o);
      } else if (op == "P") {
        int64_t client;
        int pinned, n;
        in >> client >> pinned >> n;
        std::vector<int32_t> b(n);
        for (auto& x : b) in >> x;
        pool.Pin(client, b.data(), n, pinned);
      } else if (op == "H") {
        int64_t client;
        int first, count, cls;
        in >> client >> first >> count >> cls;
        out = " hold " + std::to_string(pool.HoldRange(client, first, count, kv.data(), kv.data(), cls));
      } else if (op == "S") {
        int first, count, cls;
        in >> first >> count >> cls;
        std::vector<int64_t> clients, ids;
        int64_t cl;
        while (in >> cl) clients.push_back(cl);
        ids.resize(clients.size());
        const std::vector<const uint16_t*> rows(clients.size(), kv.data());
        pool.HoldRanges(clients.data(), int(clients.size()), first, count, rows.data(), rows.data(), cls, ids.data());
        out = " holds";
        for (int64_t id : ids) out += " " + std::to_string(id);
      } else if (op == "X") {
        std::vector<int64_t> ids;
        int64_t h;
        while (in >> h) ids.push_back(h);
        pool.Unhold(ids.data(), int(ids.size()));
      } else if (op == "R") {
        int64_t a, b;
        in >> a >> b;
        out = " freed " + std::to_string(pool.ReleaseRange(a, b));
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
      } else if (op == "O") {
        int64_t client;
        int n;
        in >> client >> n;
        std::vector<int32_t> b(n), sl(n);
        for (auto& x : b) in >> x;
        BlockPool::EnsureOptions o;
        o.source = BlockPool::Source::kIndexed;
        o.hold = true;
        pool.Ensure(client, b.data(), n, kv.data(), kv.data(), sl.data(), o);
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
    const PoolStats s = pool.Stats();
    printf("%s used %ld pinned %ld hits %ld misses %ld evictions %ld rangeHeld %ld reuses %ld patched %ld%s\n",
           op.c_str(), long(s.used), long(s.pinned), long(s.hits), long(s.misses), long(s.evictions), long(s.rangeHeld),
           long(s.rangeReuses), long(s.rangePatched), out.c_str());
  }
}
