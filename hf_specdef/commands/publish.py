"""``hf-specdef publish``: protect, verify, write a model card and push to the Hub (or ``--dry-run``).

Example::

    hf-specdef publish --model meta-llama/Llama-3.2-1B --repo-id me/Llama-3.2-1B-specdef --alpha 1000 --private
    HF_HUB_OFFLINE=1 hf-specdef publish --model ./my-model --dry-run --output-dir ./my-model-specdef --json

The token comes from ``HF_TOKEN`` or ``hf auth login``; there is deliberately no ``--token`` flag (a token on the
command line lands in shell history and process listings).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import MODES, PRECISION_POLICIES, RECORD_LEVELS, SITE_TYPES, SpecDefConfig


def parse_layers(text: str) -> str | tuple[int, ...]:
    """``all`` | ``cross-attention`` | ``random:N`` | ``0,3,5``."""
    text = text.strip()
    if text in ("all", "cross-attention") or text.startswith("random:"):
        return text
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers {text!r}: use 'all', 'cross-attention', 'random:N' or a comma-separated list of layer indices"
        ) from None


def parse_sites(text: str) -> tuple[str, ...]:
    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in sites if s not in SITE_TYPES]
    if bad or not sites:
        raise argparse.ArgumentTypeError(f"--sites {text!r}: use a comma-separated subset of {','.join(SITE_TYPES)}")
    return sites


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-specdef publish``."""
    parser.add_argument("--model", required=True, help="local checkpoint folder (model or diffusers pipeline) or Hub id")
    parser.add_argument("--repo-id", help="destination Hub repository owner/name (optional with --dry-run)")
    parser.add_argument("--base-model", help="the source's Hub id for the card metadata when --model is a local folder")
    cfg = parser.add_argument_group("protection (SpecDefConfig)")
    cfg.add_argument("--alpha", type=float, help="inflation factor > 1 (default 1000)")
    cfg.add_argument("--sites", type=parse_sites, help=f"comma-separated subset of {','.join(SITE_TYPES)}")
    cfg.add_argument("--top-k", type=int, help="directions / channels per site block (default 1)")
    cfg.add_argument("--layers", type=parse_layers, help="all | cross-attention | random:N | 0,1,5")
    cfg.add_argument("--mode", choices=MODES, help="spectral (default) or axis")
    cfg.add_argument("--precision", choices=PRECISION_POLICIES, help="precision-budget policy (default refuse)")
    cfg.add_argument("--record", choices=RECORD_LEVELS, help="detail of the protection record and card (default minimal)")
    cfg.add_argument("--tolerance", type=float, help="max relative output deviation accepted (default 1e-4)")
    cfg.add_argument("--seed", type=int, help="seed for --layers random:N")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--dry-run", action="store_true", help="only write the folder; no token, no network")
    parser.add_argument("--output-dir", help="keep the published folder here (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--force", action="store_true", help="protect even if the source is already protected")
    parser.add_argument("--measure", action="store_true", help="also measure resistance (evaluation harness) for the card")
    parser.add_argument("--commit-message", help="commit message of the upload (default names alpha, sites, deviation)")
    parser.add_argument("--template", help="custom Jinja model-card template (default: the packaged one)")
    parser.add_argument("--device", help="device for the protection math (default: the best available)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def config_from_args(args: argparse.Namespace) -> SpecDefConfig:
    """A :class:`SpecDefConfig` from the flags that were given (defaults for the rest)."""
    keys = ("alpha", "sites", "top_k", "layers", "mode", "precision", "record", "tolerance", "seed")
    given: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return SpecDefConfig(**given)


def run(args: argparse.Namespace) -> int:
    """Run the publication; print a summary (or JSON). Exit code 0 only when everything succeeded."""
    from ..publish import publish

    result = publish(
        args.model, args.repo_id, config_from_args(args), private=args.private, dry_run=args.dry_run,
        output_dir=args.output_dir, measure=args.measure, commit_message=args.commit_message,
        base_model=args.base_model, overwrite=args.overwrite, force=args.force, template=args.template,
        device=args.device, progress=not args.json,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result))
    return 0
