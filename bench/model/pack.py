"""Packs what bench:model needs on a machine without ../shared and without network (the lent GPU machine) into
.device/model/ (ignored by git; carried to that machine as one path, see bench/model/device.sh):

- kvrecall-code-13M/: config.json, the safetensors index and both bf16 shards xz-compressed (27.3 MB -> ~19.4 MB;
  bf16 weights do not compress much further: their low bytes are noise);
- heldout-seed<N>.xz: heldout.corpus(N), the exact held-out bytes drawn here (Debian's python3 dist-packages), so
  that trial i is the same context on both machines (~8 MB -> ~1.6 MB each);
- py/msgpack/: Debian's pure-Python msgpack (the client's codec), for a Python without msgpack
  (device.sh adds it with MSGPACK_PUREPYTHON=1 only when `import msgpack` fails).

    python3 bench/model/pack.py [--seeds 0] [--dest .device/model]

Prints the packed size: the device tool carries at most 64 MiB of ignored paths, and node (24 MB xz), the addon
(7.7 MB), dist/ (2.2 MB) and the production node_modules (4.4 MB xz) take ~38 MB of it.
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import subprocess
from pathlib import Path

import heldout
from model import model_dir

REPO = Path(__file__).resolve().parents[2]
MSGPACK = Path("/usr/lib/python3/dist-packages/msgpack")


def xz(src: Path, dest: Path) -> None:
    if shutil.which("xz"):
        with open(dest, "wb") as f:
            subprocess.run(["xz", "-9", "-T2", "-c", str(src)], stdout=f, check=True)
    else:
        dest.write_bytes(lzma.compress(src.read_bytes(), preset=9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--dest", default=str(REPO / ".device" / "model"))
    a = ap.parse_args()
    dest = Path(a.dest)
    mdest = dest / model_dir().name
    mdest.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir().iterdir()):
        if f.suffix == ".safetensors":
            target = mdest / (f.name + ".xz")
            if not target.exists() or target.stat().st_mtime < f.stat().st_mtime:
                xz(f, target)
        elif f.suffix == ".json" and f.name != "train_result.json":
            shutil.copy(f, mdest / f.name)
    for seed in [int(s) for s in a.seeds.split(",") if s.strip()]:
        (dest / heldout.packed_name(seed)).write_bytes(lzma.compress(heldout.corpus(seed), preset=9))
    if MSGPACK.is_dir():
        pdest = dest / "py" / "msgpack"
        pdest.mkdir(parents=True, exist_ok=True)
        for f in MSGPACK.glob("*.py"):
            shutil.copy(f, pdest / f.name)
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"packed {dest}: {total / 2**20:.1f} MiB")
    for f in sorted(dest.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(dest)} {f.stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
