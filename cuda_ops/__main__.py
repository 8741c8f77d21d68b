"""``python -m cuda_ops build|info``: build the compiled op ahead of time, or show its state.

Importing ``cuda_ops`` is what builds (once, cached; see cuda_ops/build.py), so ``build`` reports
that build and exits 1 when a compiler was there but the CPU or CUDA kernels did not compile, or
(``--require-cuda``) when the CUDA kernels are not compiled for any reason.
Set SELFNORM_OPS_VERBOSE=1 to see the compiler commands.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuda_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile the CPU and (with nvcc and a CUDA torch) CUDA "
                           "kernels; honours TORCH_CUDA_ARCH_LIST; cached after the first build")
    build.add_argument("--require-cuda", action="store_true",
                       help="exit 1 unless the CUDA kernels are compiled (GPU images and GPU "
                            "test runs: no silent fallback to the Python reference)")
    show = sub.add_parser("info", help="which backends are compiled and active")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import cuda_ops
    state = cuda_ops.status
    if args.command == "build":
        if state.error:
            print(f"error: {state.error}", file=sys.stderr)
            return 1
        note = f" ({state.reason})" if state.reason else ""
        if args.require_cuda and state.cuda != "compiled":
            import torch
            fix = (f"install the CUDA toolkit (nvcc) for torch's CUDA {torch.version.cuda} or set "
                   f"CUDA_HOME" if torch.version.cuda else "install a CUDA build of torch")
            print(f"error: the CUDA kernels are {state.cuda}{note}; {fix}, then run "
                  f"`python -m cuda_ops build` again", file=sys.stderr)
            return 1
        print(f"cuda_ops: cpu {state.cpu}, cuda {state.cuda}{note}; library {state.library}")
        return 0
    if args.json:
        print(json.dumps(cuda_ops.info()))
    else:
        for key, value in cuda_ops.info().items():
            print(f"{key:<15} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
