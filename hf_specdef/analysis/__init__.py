"""Analysis of a protection: verification, the spectral inspector, stock loading, release dtypes, the downcast guard."""
