"""Subcommands of the ``hf-specdef`` command line (one module each)."""
