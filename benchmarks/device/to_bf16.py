"""Copy a safetensors checkpoint with its float32 tensors cast to bfloat16, metadata kept byte for byte.

Used by benchmarks/device/env_common.sh (ship_ckpt) to halve what a device call brings back. Other dtypes
are kept as they are: textgen's stats-source PMF (float64) must stay exact. textgen's and imagegen's loaders
cast the weights back to float32 when they load such a file.

    python benchmarks/device/to_bf16.py SRC.safetensors DST.safetensors
"""

from __future__ import annotations

import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main(src: str, dst: str) -> None:
    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
        tensors = {}
        for key in f.keys():
            t = f.get_tensor(key)
            tensors[key] = t.to(torch.bfloat16) if t.dtype == torch.float32 else t
    save_file(tensors, dst, metadata=metadata)
    n32 = sum(1 for t in tensors.values() if t.dtype == torch.bfloat16)
    print(f"{dst}: {n32} of {len(tensors)} tensors in bf16")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
