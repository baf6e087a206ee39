"""The deformation engine: plans and steps for each pair, the precision policy, the protection record and report."""
