"""The research harness (behind the ``redteam``/``demo`` extras): the red team on real models and the toy benchmark."""
