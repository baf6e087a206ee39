"""``hf-specdef protect SRC DST``: protect a checkpoint folder, streaming shard by shard.

Example::

    hf-specdef protect ./Llama-3.2-1B ./Llama-3.2-1B-specdef --alpha 1000 --sites attn.vo,attn.qk,mlp,norm
    hf-specdef protect ./sd-pipeline ./sd-pipeline-specdef --mode axis --alpha 1024 --layers cross-attention --json

Exit code 0 only when the protected folder was written and verified.
"""

from __future__ import annotations

import argparse
import json

from hf_specdef.cli.config_args import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-specdef protect``."""
    parser.add_argument("src", metavar="SRC", help="checkpoint folder (safetensors, sharded or not) or diffusers pipeline folder")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist unless --overwrite)")
    add_config_arguments(parser)
    parser.add_argument("--device", help="device for the deformation math (default: cpu, which streams faster than cuda; "
                                         "see docs/performance.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST (only after success)")
    parser.add_argument("--force", action="store_true", help="protect even if SRC already carries a protection record")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip re-reading and checking the written files (not recommended)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.add_argument("--pipeline-norm", dest="pipeline_norm", action=argparse.BooleanOptionalAction, default=None,
                        help="pipeline folders: fold the text encoder's final norm into every cross-attention to_k/to_v "
                             "(default: where it applies; --pipeline-norm requires it, --no-pipeline-norm skips it)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Protect SRC into DST and print the report. Exit code 0 on success."""
    from hf_specdef.protection.streaming import protect_checkpoint

    report = protect_checkpoint(args.src, args.dst, config_from_args(args), device=args.device, overwrite=args.overwrite,
                                force=args.force, progress=args.progress, verify=args.verify,
                                pipeline_norm=args.pipeline_norm)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0
