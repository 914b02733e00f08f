#!/usr/bin/env python3
"""An independent NF4 reference for tests/test_nf4.cpp, in PyTorch.

    nf4_reference.py OUT.safetensors

Builds the NF4 code book from its definition (QLoRA / bitsandbytes create_normal_map with offset
0.9677083: Φ⁻¹ of 8 upper and 7 lower equally spaced probabilities, plus 0, scaled to a maximum of 1;
Φ⁻¹ from torch.special.ndtri), quantizes a seeded Gaussian matrix in blocks of 64 by nearest code
value, and writes the code book, the matrix, its per-element indices and block maxima, and the
dequantized matrix.
"""
import sys

import torch
from safetensors.torch import save_file


def code_book(offset=0.9677083):
    upper = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    lower = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([upper, lower, torch.zeros(1, dtype=torch.float64)])
    values, _ = torch.sort(values / values.max())
    return values


def main():
    code = code_book()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 200, generator=g) * 0.02  # 19200 elements: 300 blocks of 64
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    scaled = blocks / absmax[:, None]
    idx = (scaled[..., None].double() - code.float().double()).abs().argmin(-1)
    deq = (code.float()[idx] * absmax[:, None]).reshape(w.shape)
    save_file({"code": code.float(), "w": w, "idx": idx.reshape(-1).to(torch.uint8), "absmax": absmax, "deq": deq}, sys.argv[1])
    print(f"nf4 reference: code book {[round(v, 6) for v in code.tolist()]}")


if __name__ == "__main__":
    main()
