"""Real-data attack scenarios (no downloads): ``text`` (tiny Llama) and ``digits`` (DDPM UNet)."""
