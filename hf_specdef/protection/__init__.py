"""Protection: in memory (``protect``), at save time, streaming over checkpoint files, and the pipeline-level site."""
