"""PEFT tuners shipped by hf-specdef (see docs/integrations.md): ``specundo``, the attacker's undo adapter."""
