"""``hf-specdef publish``: protect, verify, write a model card and push to the Hub (or ``--dry-run``).

Example::

    hf-specdef publish --model meta-llama/Llama-3.2-1B --repo-id me/Llama-3.2-1B-specdef --alpha 1000 --private
    HF_HUB_OFFLINE=1 hf-specdef publish --model ./my-model --dry-run --output-dir ./my-model-specdef --json
    hf-specdef publish --model ./my-model --repo-id me/my-model-specdef --quantize q8_0,q4_0,q5_0   # or --no-quantize

By default the release is measured quantized in ``q8_0`` and ``q4_0`` (transformers models) and the card states the
figures, "breaks it" included; ``--quantize`` names other formats, ``--no-quantize`` measures none (the formats of
``--quantization-safe`` are promises, always measured, and refuse the publication when broken).

The token comes from ``HF_TOKEN`` or ``hf auth login``; there is deliberately no ``--token`` flag (a token on the
command line lands in shell history and process listings).
"""

from __future__ import annotations

import argparse
import json

from hf_specdef.cli.config_args import add_config_arguments, config_from_args, parse_formats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``hf-specdef publish`` to ``parser``.

    Args:
        parser: the sub-command's parser.

    Example:

    ```python
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> parser.parse_args(["--model", "x", "--no-quantize"]).quantize
    ()
    ```
    """
    parser.add_argument("--model", required=True, help="local checkpoint folder (model or diffusers pipeline) or Hub id")
    parser.add_argument("--repo-id", help="destination Hub repository owner/name (optional with --dry-run)")
    parser.add_argument("--base-model", help="the source's Hub id for the card metadata when --model is a local folder")
    add_config_arguments(parser)
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--dry-run", action="store_true", help="only write the folder; no token, no network")
    parser.add_argument("--output-dir", help="keep the published folder here (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--force", action="store_true", help="protect even if the source is already protected")
    parser.add_argument("--measure", action="store_true", help="also measure resistance (evaluation harness) for the card")
    parser.add_argument("--redteam", metavar="RESULTS_JSON", default=None,
                        help="put the worst case of hf-specdef redteam (its results.json, same configuration) on the card")
    parser.add_argument("--commit-message",
                        help="commit message of the upload (default names the mode, factors, sites and deviation)")
    parser.add_argument("--template", help="custom Jinja model-card template (default: the packaged one)")
    parser.add_argument("--device", help="device for the protection math (default: cpu, which streams faster "
                                                                 "than cuda; see docs/performance.md)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--quantize", type=parse_formats, default=None, metavar="FORMATS",
                       help="quantization formats to measure on the release for the card (transformers models; "
                            "default: q8_0,q4_0; a format that breaks the release is reported, not refused; the "
                            "formats of --quantization-safe are always measured and must hold)")
    quant.add_argument("--no-quantize", dest="quantize", action="store_const", const=(),
                       help="measure no quantization for the card (the card then says it was not measured)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the publication; print a summary (or JSON).

    Args:
        args: the parsed flags of :func:`add_arguments`.

    Returns:
        The exit code: 0 only when everything succeeded (a refused publication raises, and the CLI reports it).

    Example:

    ```python
    >>> from hf_specdef.cli import build_parser
    >>> run(build_parser().parse_args(["publish", "--model", "./m", "--dry-run"]))
    0
    ```
    """
    from hf_specdef.publishing.publish import publish

    result = publish(
        args.model, args.repo_id, config_from_args(args), private=args.private, dry_run=args.dry_run,
        output_dir=args.output_dir, measure=args.measure, redteam=args.redteam, commit_message=args.commit_message,
        base_model=args.base_model, overwrite=args.overwrite, force=args.force, template=args.template,
        device=args.device, progress=not args.json, quantize=args.quantize,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else str(result))
    return 0
