"""Entry point: ``python -m app <subcommand>``.

Lightning's subcommands (fit/validate/test/predict) go to the LightningCLI; the tools below are
plain argparse programs, imported lazily so that e.g. ``solve`` starts without torch.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from app.errors import EXIT_CODES, Preempted, UserError, exit_code

# name -> (module with ``main(argv) -> int``, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "solve": ("app.solve", "solve an activation's λ, α, β from ε (paper eq. 11/13, Table 5)"),
    "prepare": ("app.prepare", "write an FFCV .beton from an image folder or dataset"),
    "diagnose": ("app.diagnose", "per-layer E[h²] and ‖∂L/∂W‖ at initialisation vs. theory"),
    "bench": ("app.bench", "benchmarks: kernels, loader, train, solver"),
    "table": ("app.table", "configs × seeds (× LR grid) → paper-style table, mean ± 95% CI"),
    "figure4": ("app.figure4", "the paper's Figure 4 of several runs side by side"),
    "selftest": ("app.selftest", "check an install where it runs: op, data, DDP, benchmarks"),
}
LIGHTNING = {
    "fit": "train a model (LightningCLI)",
    "validate": "evaluate on the validation set",
    "test": "evaluate on the test set",
    "predict": "run prediction",
}


def usage() -> str:
    lines = ["usage: python -m app <subcommand> [options]", "", "subcommands:"]
    for name, text in LIGHTNING.items():
        lines.append(f"  {name:<9} {text}")
    for name, (_, text) in TOOLS.items():
        lines.append(f"  {name:<9} {text}")
    lines += ["", "`python -m app <subcommand> --help` shows each one's options."]
    return "\n".join(lines)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in TOOLS:
        return int(importlib.import_module(TOOLS[name][0]).main(rest) or 0)
    if name in LIGHTNING or name.startswith("-"):
        from app.cli import cli_main
        return int(cli_main(argv) or 0)
    raise UserError(f"unknown subcommand {name!r}; choose one of: "
                    f"{', '.join([*LIGHTNING, *TOOLS])}")


class _DropLines(logging.Filter):
    """Drops log records that start with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(self.prefixes)


def quiet_third_party() -> None:
    """Silence known-benign third-party noise; our own warnings stay."""
    # Lightning 2.6 on torch 2.14: its own use of a deprecated pytree API
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning's use of jsonargparse APIs deprecated in jsonargparse 4.49
    warnings.filterwarnings("ignore", message=r".*(instantiate_classes|skip_none) (parameter )?"
                                              r"was deprecated")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLines) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLines("💡 Tip", "Trainer already configured with model summary"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_third_party()
    try:
        return _dispatch(argv)
    except tuple(EXIT_CODES) as err:
        if os.environ.get("SELFNORM_DEBUG"):
            raise
        print(f"{'stopped' if isinstance(err, Preempted) else 'error'}: {err}", file=sys.stderr)
        return exit_code(err)
