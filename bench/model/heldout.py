"""Held-out text for kvrecall-code-13M and the pass-key task.

The model was trained on Python's standard library, npm .js/.ts trees and
C/C++ headers; held out is other Python code: Debian's python3
dist-packages (env KVRECALL_HELDOUT_DIR overrides the folder). Files are
sorted, shuffled with a fixed seed and joined by `\\n\\x1e\\n`, the training
separator; samples are windows of that corpus.

A packed corpus (bench/model/pack.py, for a machine without that folder or with another version of it):
env KVRECALL_HELDOUT_PACK names a folder holding `heldout-seed<seed>.xz`, the exact bytes `corpus(seed)`
returned where it was packed, so both machines draw the same trials.

Pass key (SOURCE.md): somewhere in the sequence `\\x1fpass key: NNNNN\\n`; the
sequence ends with `\\x1fpass key? ` and the answer is the five digits.
"""

from __future__ import annotations

import lzma
import os
from pathlib import Path
from typing import Tuple

import numpy as np

SEPARATOR = b"\n\x1e\n"
DEFAULT_DIR = "/usr/lib/python3/dist-packages"
QUESTION = b"\x1fpass key? "
PACKED_BYTES = 8 << 20  # the default corpus size, the one pack.py packs


def packed_name(seed: int) -> str:
    return f"heldout-seed{seed}.xz"


def corpus(seed: int = 0, max_bytes: int = PACKED_BYTES) -> bytes:
    pack = os.environ.get("KVRECALL_HELDOUT_PACK")
    if pack:
        path = Path(pack) / packed_name(seed)
        if not path.is_file() or max_bytes != PACKED_BYTES:
            raise FileNotFoundError(f"{path}: only corpus(seed) at {PACKED_BYTES} bytes is packed (bench/model/pack.py)")
        return lzma.decompress(path.read_bytes())
    root = Path(os.environ.get("KVRECALL_HELDOUT_DIR", DEFAULT_DIR))
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and p.stat().st_size >= 512)
    if not files:
        raise FileNotFoundError(f"no .py files under {root}; set KVRECALL_HELDOUT_DIR")
    order = np.random.default_rng(seed).permutation(len(files))
    parts, total = [], 0
    for i in order:
        b = files[i].read_bytes()
        parts.append(b)
        total += len(b) + len(SEPARATOR)
        if total >= max_bytes:
            break
    return SEPARATOR.join(parts)


def window(text: bytes, n: int, rng: np.random.Generator) -> bytes:
    start = int(rng.integers(0, len(text) - n))
    return text[start:start + n]


def plant(text: bytes, n: int, rng: np.random.Generator, depth: float | None = None) -> Tuple[bytes, bytes, int]:
    """A pass-key sequence of exactly n bytes from a random window of text:
    returns (sequence, five-digit answer, offset of the plant). depth in [0, 1]
    places the plant; None draws it uniformly."""
    key = b"%05d" % int(rng.integers(0, 100000))
    line = b"\x1fpass key: " + key + b"\n"
    body = bytearray(window(text, n - len(QUESTION), rng))
    room = len(body) - len(line)
    at = int(round((rng.random() if depth is None else depth) * room))
    body[at:at + len(line)] = line
    return bytes(body) + QUESTION, key, at
