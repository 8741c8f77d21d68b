"""``python -m app bench <name>``: speed and memory targets live here, never in timed tests."""
from __future__ import annotations

import importlib

from app.errors import UserError

# name -> (module with ``main(argv) -> int``, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "solver": ("app.bench.solver", "time solving all of Table 5"),
    "kernels": ("app.bench.kernels", "selu_family op vs. native SELU / ELU / reference / compile"),
    "loader": ("app.bench.loader", "FFCV train loader vs. torchvision ImageFolder + DataLoader"),
    "train": ("app.bench.train", "training images/s: sSELU (central, WC, trainable λ) vs. BN+ReLU"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m app bench <name> [options]\n\nbenchmarks:")
        for name, (_, text) in BENCHES.items():
            print(f"  {name:<8} {text}")
        return 0
    if argv[0] not in BENCHES:
        raise UserError(f"unknown benchmark {argv[0]!r}; choose one of: {', '.join(BENCHES)}")
    return int(importlib.import_module(BENCHES[argv[0]][0]).main(argv[1:]) or 0)
