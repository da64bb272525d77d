"""Are two model directories the same model, bit for bit? The check behind the default model
card's reproduction claim.

Compares every tensor of ``model.safetensors`` by its raw bytes (float equality would call -0.0
and 0.0 the same, and NaN different from itself) and ``config.json`` / ``tokenizer.json`` byte
by byte. The safetensors files themselves may differ while every tensor is identical: the
header's metadata is written from a hash map, so its key order can change from run to run.

Run::

    python benchmarks/same_weights.py runs/nano/model rxruntime/small_model

Exits 0 when everything matches, 1 otherwise, and prints what differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

SIDE_FILES = ("config.json", "tokenizer.json")


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


def differences(a: Path, b: Path) -> list[str]:
    """What differs between model directories ``a`` and ``b``; empty when they are the same model."""
    found: list[str] = []
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for name in sorted(set(ta) ^ set(tb)):
        found.append(f"tensor {name}: only in {a if name in ta else b}")
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            found.append(f"tensor {name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(_raw(x), _raw(y)):
            found.append(f"tensor {name}: values differ (largest difference {(x.float() - y.float()).abs().max():.3g})")
    for side in SIDE_FILES:
        pa, pb = a / side, b / side
        if pa.exists() != pb.exists():
            found.append(f"{side}: only in {a if pa.exists() else b}")
        elif pa.exists() and pa.read_bytes() != pb.read_bytes():
            found.append(f"{side}: contents differ")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    found = differences(args.a, args.b)
    with safe_open(args.a / "model.safetensors", "pt") as header:  # the count, without loading the tensors again
        count = len(header.keys())
    for line in found:
        print(line)
    print(f"{'different' if found else 'the same'}: {count} tensors compared by their bytes, {', '.join(SIDE_FILES)}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
