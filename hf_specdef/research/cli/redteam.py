"""``hf-specdef redteam MODEL --out DIR``: fine-tune copies of a real model, unprotected and protected, with a suite
of attacks on transformers' Trainer and PEFT, and report the worst case (see hf_specdef.research.redteam)."""

from __future__ import annotations

import argparse
import json
import time

from hf_specdef.errors import require_extra
from hf_specdef.research.redteam.attacks import SUITE
from hf_specdef.research.redteam.config import QUICK_ATTACKS, VARIANTS

HELP = "Fine-tune a real model, unprotected and protected, with a suite of attacks; report the worst case."

def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="folder of the UNPROTECTED causal LM (with its tokenizer); copies are protected here")
    p.add_argument("--out", required=True, help="new folder for results.json, results.md and PNG plots")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help=f"attacks {', '.join(QUICK_ATTACKS)} (and their unprotected baselines), 1 seed, default "
                           "protection: about 15 min for SmolLM2-135M on 2 CPU cores; the default")
    size.add_argument("--full", action="store_true",
                      help="every attack, 6 protection variants, 3 seeds (meant for a GPU)")
    size.add_argument("--tiny", action="store_true", help="a smoke test of seconds on tiny models")
    p.add_argument("--attacks", type=_names, default=None,
                   help=f"comma-separated attack names, of: {', '.join(SUITE)}; default: the preset's")
    p.add_argument("--variants", type=_names, default=None,
                   help=f"protection variants: {', '.join(VARIANTS)}, custom (default: default; --full: six variants)")
    p.add_argument("--protection", default=None,
                   help="JSON of SpecDefConfig fields for the 'custom' variant, e.g. '{\"alpha\": 100}'")
    p.add_argument("--protected", action="append", default=[], metavar="NAME=PATH",
                   help="also attack an already protected copy of MODEL (repeatable); without --variants, only these")
    p.add_argument("--reuse-unprotected", default=None, metavar="RESULTS_JSON",
                   help="reuse the unprotected baselines of an earlier run with the same settings and data")
    p.add_argument("--reuse-runs", action="append", default=[], metavar="RESULTS_JSON",
                   help="take the runs of an earlier red team on the same model, data and settings (seeds aside) "
                        "instead of training them again, e.g. to add seeds or attacks to it (repeatable)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1); the headline is their median "
                                                                  "(default 1; --full: 3)")
    p.add_argument("--data", default=None, help="attack data: a .txt or .jsonl file (default: the shipped corpus)")
    p.add_argument("--text-field", default="text", help="field of the .jsonl records holding the text")
    p.add_argument("--reference-steps", type=int, default=None, help="steps in which the unprotected model sets the target "
                                                                            "(default 8; --full: 20; --tiny: 4)")
    p.add_argument("--budget-factor", type=int, default=None, help="budget = reference steps x this (default 10; --tiny: 4)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per training window (default 64; --tiny: 16)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted red team with the same --out and options: its finished runs "
                        "(kept in OUT.runs.jsonl as they finish) are not run again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    require_extra("peft", "redteam", "hf-specdef redteam")
    require_extra("accelerate", "redteam", "hf-specdef redteam")
    require_extra("matplotlib", "redteam", "hf-specdef redteam")
    from hf_specdef.research.redteam.config import RedTeamConfig
    from hf_specdef.research.redteam.report import headline
    from hf_specdef.research.redteam.suite import run_redteam
    from hf_specdef.research.redteam.training import is_main_process

    preset = "full" if args.full else "tiny" if args.tiny else "quick"
    kw: dict = {"data": args.data, "text_field": args.text_field}
    for name in ("attacks", "variants", "reference_steps", "budget_factor", "batch_size", "seq_len"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.seeds is not None:
        kw["seeds"] = tuple(range(args.seeds))
    if args.protection:
        try:
            kw["protection"] = json.loads(args.protection)
        except json.JSONDecodeError as e:
            raise ValueError(f"--protection {args.protection!r} is not valid JSON ({e.msg}).") from None
        kw.setdefault("variants", ("custom",))
    protected = {}
    for item in args.protected:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--protected {item!r}: use NAME=PATH, e.g. --protected mine=./model-specdef")
        protected[name] = path
    if protected and args.variants is None:
        kw["variants"] = ()
    cfg = RedTeamConfig.preset_config(preset, **kw)
    start = time.perf_counter()
    results = run_redteam(args.model, args.out, cfg, protected=protected, reuse_unprotected=args.reuse_unprotected,
                          reuse_runs=args.reuse_runs, progress=not args.no_progress, resume=args.resume)
    if is_main_process():
        print(headline(results))
        print(f"wrote {args.out}/results.json, results.md and plots in {(time.perf_counter() - start) / 60:.1f} min")
    return 0
