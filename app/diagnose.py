"""``python -m app diagnose --config X.yaml [--batches N] [--out DIR]``: normalization at init.

Builds the model and data from the same config as ``fit``, runs N forward/backward passes at
initialisation (no optimizer step) and prints, per conv/linear layer, the measured E[h²], mean
of h and ‖∂L/∂W‖_F beside the mean-field prediction (padding-aware for convolutions, with the
plain one-number recursion beside it), then writes the Figure 4-style PNG (and the numbers as
JSON). A check of an activation, ε or architecture in seconds, before GPU hours.

The measurement is ``models.training.diagnose``, the theory ``models.theory.propagation``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch

from app.cli import make_cli, resolve_config
from app.errors import UserError
from app.paths import check_output_folder
from models.training.diagnose import Diagnosis, diagnose, pool
from models.training.mixup import Mixup
from models.training.plot import save_png
from models.training.stats import activation_label


def format_table(d: Diagnosis) -> str:
    """One line per layer: measured beside theory (the padding-aware one, then the plain one)."""
    width = max(5, *(len(n) for n in d.names))
    head = (f"{'#':>3}  {'layer':<{width}}  {'E[h²]':>9}  {'theory':>9}  {'plain':>9}  "
            f"{'mean(h)':>9}  {'‖∂L/∂W‖_F':>10}  {'per sample':>10}  {'theory':>10}  "
            f"theory from")
    lines = [head, "-" * len(head)]
    c = d.columns()
    for i, (name, link) in enumerate(zip(d.names, d.links)):
        lines.append(f"{i:>3}  {name:<{width}}  {_fmt(c['h2'][i], 9)}  "
                     f"{_fmt(c['h2_theory'][i], 9)}  {_fmt(c['h2_theory_plain'][i], 9)}  "
                     f"{_fmt(c['mean'][i], 9)}  {_fmt(c['grad_w'][i], 10)}  "
                     f"{_fmt(c['grad_w_sample'][i], 10)}  {_fmt(c['grad_w_theory'][i], 10)}  "
                     f"{link}")
    return "\n".join(lines)


def theory_note(d: Diagnosis) -> str:
    """What the theory columns are, and which one applies to these layers."""
    aware = sum(kind == "padding-aware" for kind in d.theory_kind)
    applies = (f"'theory' applies: padding-aware for {aware} of {len(d.theory_kind)} layers "
               f"(a per-position E[h²] map through each conv's kernel, stride, padding and "
               f"map size), the same as 'plain' elsewhere"
               if aware else "'theory' and 'plain' are the same recursion here (no conv)")
    return ("theory: E[h²] chained through the activations from the first layer's measured "
            "input; ‖∂L/∂W‖_F per sample, (1 + δ_q) per layer up from the deepest layer of each "
            "chain (Prop. 3.1); 'measured' starts a new chain. 'plain' treats each conv as a "
            f"dense layer and ignores zero padding, which lowers E[h²] at map borders. {applies}.")


def _fmt(v: float, width: int) -> str:
    return f"{'—':>{width}}" if math.isnan(v) else f"{v:>{width}.4g}"


# ---- the command --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app diagnose",
        description="Forward/backward N batches at initialisation (no optimizer step); print "
                    "per-layer E[h²], mean and ‖∂L/∂W‖_F beside the mean-field theory and write "
                    "the Figure 4-style PNG. Other --key value options override the config, "
                    "e.g. --model.init_args.eps 0.03.")
    p.add_argument("--config", "-c", required=True,
                   help="training config: a path or a shipped name (configs/)")
    p.add_argument("--batches", type=int, default=4, help="forward/backward passes (default 4)")
    p.add_argument("--out", type=Path, default=Path("diagnose"),
                   help="folder for <config>.png and <config>.json (default ./diagnose)")
    p.add_argument("--draws", type=int, default=3,
                   help="weight draws (seeds seed, seed+1, ...) pooled on the same batches; the "
                        "theory is a mean over draws (default 3; 1: the weights fit starts "
                        "from)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="fnmatch patterns of the layers to show (default: all conv/linear)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where to run (default: a GPU when there is one)")
    return p


def main(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(argv)
    if args.batches < 1:
        raise UserError(f"--batches must be at least 1, got {args.batches}")
    if args.draws < 1:
        raise UserError(f"--draws must be at least 1, got {args.draws}")
    check_output_folder(args.out, "--out")

    stem = resolve_config(args.config).stem
    # one device, no logger: diagnose must run anywhere the config can be read
    cli = make_cli(["--config", args.config, *overrides, f"--trainer.accelerator={args.device}",
                    "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
                    "--trainer.logger=false"], run=False)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    data.trainer = trainer  # batches on the trainer's device and in its precision's dtype
    data.prepare_data()
    data.setup("fit")
    plugin = trainer.precision_plugin
    # copies: ffcv reuses its batch buffers, and every draw sees the same batches
    batches = [[t.clone() if isinstance(t, torch.Tensor) else t for t in batch]
               for batch in itertools.islice(iter(data.train_dataloader()), args.batches)]
    seed = cli.config.get("seed_everything")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else torch.initial_seed()
    results = []
    for k in range(args.draws):
        if k:  # draw 0 is the model fit would start from; the others the next seeds' weights
            torch.manual_seed(seed + k)
            model = type(model)(**{k: v for k, v in model.hparams.items()
                                   if not k.startswith("_")})  # LightningCLI's _class_path
        _set_mixer(model, trainer)
        model = plugin.convert_module(model).to(trainer.strategy.root_device)
        results.append(diagnose(model, batches, args.layers, context=plugin.forward_context))
    result = pool(results)

    label = activation_label(model)
    print(f"{stem}: {type(model).__name__}, {label}; {args.draws} weight draw(s) × "
          f"{len(batches)} batch(es) on {trainer.strategy.root_device}; first layer's input "
          f"E[x²] = {result.input_h2[:, 0].mean():.4g}")
    print(format_table(result))
    print(theory_note(result))
    args.out.mkdir(parents=True, exist_ok=True)
    png, js = args.out / f"{stem}.png", args.out / f"{stem}.json"
    save_png(result.figure(f"{label} — {stem}, at initialisation"), png)
    js.write_text(json.dumps({"config": stem, "activation": label, "draws": args.draws,
                              "batches": len(batches), **result.to_json()},
                             indent=1, ensure_ascii=False))
    print(f"wrote {png} and {js}")
    return 0


def _set_mixer(model: Any, trainer: Any) -> None:
    """Mix like the first training epoch does when the config has a Mixup callback: mixup
    lowers the inputs' second moment (paper section 5), which is what diagnose measures."""
    mixers = [cb for cb in trainer.callbacks if isinstance(cb, Mixup) and cb.active(0)]
    if mixers and hasattr(model, "batch_mixer"):
        model.batch_mixer = mixers[0]
