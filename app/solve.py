"""``python -m app solve``: an activation's parameters from ε, Table 5, and Figures 1-3.

Imports numpy/scipy only (never torch or lightning): people script it over many ε.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.errors import UserError
from app.paths import check_output_folder
from models.theory.solver import ACTIVATIONS, TABLE5, Solution, solve

if TYPE_CHECKING:  # matplotlib only when drawing: solving stays quick to start
    from matplotlib.figure import Figure


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app solve",
        description="Solve λ, α, β of an activation for a given ε (paper eq. 11; eq. 13 with "
                    "--central) and report what they achieve at the fixed point q = 1.")
    p.add_argument("--activation", "-a", choices=ACTIVATIONS, type=str.lower,
                   help="activation to solve (selu and relu need no ε)")
    p.add_argument("--eps", type=float, help="ε = φ(1) − 1, e.g. 0.06 (paper: 0.01 to 0.07)")
    p.add_argument("--central", action="store_true", help="also require E[f] = 0 (eq. 13)")
    p.add_argument("--lambda-min", type=float, default=1.0, help="lower bound on λ (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--table", action="store_true", help="print Table 5 beside the paper's values")
    p.add_argument("--plot", metavar="DIR", type=Path,
                   help="write Figures 1-3 (φ(q), 1+δ_q, |output mean|) as PNGs into DIR")
    return p


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def format_solution(s: Solution) -> str:
    name = s.activation + (" (central)" if s.central else "")
    rows = [("activation", name), ("ε", f"{s.eps:.6g}"), ("λ", _fmt(s.lam, 6)),
            ("α", _fmt(s.alpha, 6)), ("β (paper)", _fmt(s.paper_beta, 6)),
            ("γ_{q=1}", _fmt(s.gamma, 6)), ("φ(1)", _fmt(s.phi1, 6)),
            ("E[f²]", _fmt(s.second_moment, 6)), ("E[f]", f"{s.mean:+.6f}")]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def format_table5() -> str:
    head = (f"{'section':<13} {'activation':<16} {'ε':>6}   {'λ':>11} {'|α|':>11} "
            f"{'β':>11} {'γ_q=1':>13}")
    lines = [head, "-" * len(head), "values: ours (paper)"]
    for section, name, eps, central, lam, alpha, beta, gamma in TABLE5:
        s = solve(name, eps, central=central)
        pb = s.paper_beta
        beta_txt = "—" if pb is None else f"{pb:.2f} ({beta:.2f})"
        lines.append(
            f"{section:<13} {name + (' (central)' if central else ''):<16} "
            f"{'—' if eps is None else eps:>6}   {s.lam:.2f} ({lam:.2f}) "
            f"{abs(s.alpha):.2f} ({alpha:.2f}) {beta_txt:>11} {s.gamma:.3f} ({gamma:.3f})")
    lines += ["", "sSELU ε=0.03: the paper's row is a feasible but worse point on the same "
              "constraint curve; the global optimum has lower γ.",
              "sSELU ε=0.07: the paper prints λ=1.06, but λ=1.06 with its α=1.94, β=0.92 gives "
              "E[f²]=1.12; α, β and γ match λ=1.00.",
              "γ agrees to ±0.001: the closed forms here are exact, the paper's γ carries "
              "quadrature error in the last digit."]
    return "\n".join(lines)


# The paper's names, and one style per activation: sSELU and lSELU nearly coincide, so sSELU is
# a wide pale band underneath and lSELU a dotted line with markers on top, both visible.
DISPLAY = {"selu": "SELU", "dselu": "dSELU", "sselu": "sSELU", "lselu": "lSELU"}
STYLES: dict[str, dict] = {
    "selu": {"color": "tab:blue", "linestyle": "-", "linewidth": 1.6, "zorder": 3},
    "dselu": {"color": "tab:orange", "linestyle": (0, (6, 2)), "linewidth": 1.6,
              "marker": "s", "markersize": 4, "zorder": 4},
    "sselu": {"color": "tab:green", "linestyle": "-", "linewidth": 3.5, "alpha": 0.5,
              "zorder": 2},
    "lselu": {"color": "tab:red", "linestyle": (0, (1, 1.5)), "linewidth": 1.8,
              "marker": "^", "markersize": 5, "zorder": 5},
}


def _label(s: Solution) -> str:
    return (f"{DISPLAY.get(s.activation, s.activation)}{' (central)' if s.central else ''}"
            f"  ε={s.eps:.3g}  γ={s.gamma:.3f}")


def _style(s: Solution, k: int) -> dict:
    # markers at staggered, evenly spaced display positions, so close curves keep theirs apart
    style = dict(STYLES.get(s.activation, {}))
    if "marker" in style:
        style["markevery"] = (0.02 + 0.04 * k, 0.12)
    return style


def figure_solutions(eps: float, central: bool, lambda_min: float) -> list[Solution]:
    """SELU and dSELU, sSELU, lSELU at ``eps`` (sSELU/lSELU centralized with ``central``)."""
    return [solve("selu")] + [solve(a, eps, central=central and a != "dselu",
                                    lambda_min=lambda_min) for a in ("dselu", "sselu", "lselu")]


def figure1(sols: list[Solution]) -> Figure:
    """φ(q) against 1/q (the curves cross the ideal 1/q at the fixed point q = 1), and beside it
    each φ(q) less SELU's, which pulls apart the curves that overlap at the left's scale."""
    from matplotlib.figure import Figure

    from models import theory

    fig = Figure(figsize=(11.5, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True)
    x = np.linspace(0.1, 4.0, 400)
    reference = theory.phi(sols[0].family, 1 / x)
    for k, s in enumerate(sols):
        phi = theory.phi(s.family, 1 / x)
        left.plot(x, phi, label=_label(s), **_style(s, k))
        right.plot(x, phi - reference, label=_label(s), **_style(s, k))
    left.plot(x, x, color="k", linestyle="--", linewidth=1, label="1/q (ideal)", zorder=1)
    left.axhline(1, color="grey", linewidth=0.8, zorder=0)
    for ax in (left, right):
        ax.axvline(1, color="grey", linewidth=0.8, linestyle=":", zorder=0)
        ax.set_xlabel("1/q")
    left.set(ylabel="φ(q)", title="(a) φ(q) and the ideal 1/q", xlim=(0, 4), ylim=(0, 2.5))
    base = DISPLAY.get(sols[0].activation, sols[0].activation)
    right.set(ylabel=f"φ(q) − φ_{base}(q)", title=f"(b) less {base}'s φ(q): the curves apart")
    left.legend(fontsize=8, loc="upper left")
    fig.suptitle("Figure 1: φ(q) = E[f'(√q·z)²] against 1/q")
    return fig


def figure2(sols: list[Solution]) -> Figure:
    """1 + δ_q, the per-layer gradient growth rate, against q."""
    from matplotlib.figure import Figure

    from models import theory

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    q = np.linspace(0.05, 3.0, 400)
    for k, s in enumerate(sols):
        ax.plot(q, theory.one_plus_delta_q(s.family, q), label=_label(s), **_style(s, k))
    ax.axvline(1, color="grey", linewidth=0.8, linestyle=":", zorder=0, label="q = 1 (fixed point)")
    ax.set(xlabel="q", ylabel="1 + δ_q", title="Figure 2: gradient growth rate 1 + δ_q per layer")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def figure3(sols: list[Solution]) -> Figure:
    """|E[f(h)]| for h ~ N(μ, σ²), one panel per activation."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from models import theory

    # constrained layout reserves room for the overall title above the panel titles
    fig = Figure(figsize=(3.6 * len(sols) + 1.4, 3.6), layout="constrained")
    axes = fig.subplots(1, len(sols), sharey=True, squeeze=False)[0]
    mu = np.linspace(-1.0, 1.0, 201)
    variances = (0.25, 0.5, 1.0, 2.0, 4.0)
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(variances)))  # ordered, like σ²
    for ax, s in zip(axes, sols):
        for var, color in zip(variances, colors):
            ax.plot(mu, np.abs(theory.output_mean(s.family, mu, var)), color=color,
                    label=f"σ² = {var:g}")
        ax.axvline(0, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlabel="E[h]", title=_label(s).replace("  ε", "\nε", 1))
    axes[0].set_ylabel("|E[f(h)]|")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    fig.suptitle("Figure 3: |output mean| for inputs h ~ N(E[h], σ²) (eq. 12)")
    return fig


def write_figures(out: Path, eps: float, central: bool, lambda_min: float) -> list[Path]:
    """Figures 1-3 of the paper for SELU, dSELU, sSELU and lSELU at ``eps``, as PNGs in ``out``."""
    sols = figure_solutions(eps, central, lambda_min)
    check_output_folder(out, "--plot")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in (("fig1_phi.png", figure1), ("fig2_delta.png", figure2),
                       ("fig3_mean.png", figure3)):
        paths.append(out / name)
        draw(sols).savefig(paths[-1], dpi=120)
    return paths


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.table:
        print(format_table5())
    if args.activation:
        s = solve(args.activation, args.eps, central=args.central, lambda_min=args.lambda_min)
        print(json.dumps(s.to_json()) if args.json else format_solution(s))
    elif not (args.table or args.plot):
        raise UserError("nothing to do: give --activation NAME (with --eps for dselu/sselu/lselu),"
                        " --table or --plot DIR.")
    if args.plot:
        eps = args.eps if args.eps is not None else 0.06
        if not (math.isfinite(eps) and eps > 0):
            raise UserError(f"ε must be positive for --plot, got {eps}; try --eps 0.06.")
        for path in write_figures(args.plot, eps, args.central, args.lambda_min):
            print(f"wrote {path}")
    return 0
