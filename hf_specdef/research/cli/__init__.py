"""The research commands of ``hf-specdef`` (``redteam``, ``bench``, ``demo``), registered as entry points."""
