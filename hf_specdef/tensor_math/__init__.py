"""Pure tensor math: top-k decompositions and the deformation matrices, exact power-of-two scaling (torch only)."""
