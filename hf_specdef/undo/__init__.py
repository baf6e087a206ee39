"""The attacker's side: blind detection of a deformation from the weights, and the in-place merge undo."""
