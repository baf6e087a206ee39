"""PEFT tuners shipped by hf-specdef (SPEC §3): ``specundo``, the attacker's undo adapter."""
