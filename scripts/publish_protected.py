#!/usr/bin/env python
"""Protect a model with SpecDef, verify it, write a model card and push it to the Hub.

A thin wrapper over ``hf-specdef publish`` (same flags, same code)::

    python scripts/publish_protected.py --model ./my-model --repo-id me/my-model-specdef --alpha 1000
    HF_HUB_OFFLINE=1 python scripts/publish_protected.py --model ./my-model --dry-run --output-dir ./out

The Hub token is read from HF_TOKEN or the huggingface_hub login; it is never printed or written.
"""

from __future__ import annotations

import sys

from hf_specdef.cli import main

if __name__ == "__main__":
    sys.exit(main(["publish", *sys.argv[1:]]))
