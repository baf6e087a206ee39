"""Image scenario: a tiny class-conditional DDPM UNet on scikit-learn's bundled 8x8 digits (no download).

The denoiser is a diffusers ``UNet2DConditionModel`` (the registry knows its transformer blocks: self- and
cross-attention, GEGLU feed-forward, pre-norms) conditioned through cross-attention on two "text" tokens:
a one-hot class token and a constant null token. It is pretrained on the digits 0-8 only; the attacker then
fine-tunes it to generate the held-out digit 9 -- a miniature of re-learning an erased concept. The loss is
the DDPM noise-prediction loss on 9s; the evaluation loss uses held-out 9s with fixed timesteps and noise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_specdef.research.evaluation.runner import cycle

logger = logging.getLogger("hf_specdef")

NUM_CLASSES = 10
HELD_OUT = 9
TOKEN_DIM = 12  # one-hot classes 0..9, a null token at index 10, one spare channel


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as ``(N, 1, 8, 8)`` floats in [-1, 1] and ``(N,)`` labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits scenario needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def class_tokens(labels: torch.Tensor) -> torch.Tensor:
    """``encoder_hidden_states`` of shape ``(B, 2, TOKEN_DIM)``: the one-hot class token and the null token."""
    t = torch.zeros(len(labels), 2, TOKEN_DIM)
    t[torch.arange(len(labels)), 0, labels] = 1.0
    t[:, 1, NUM_CLASSES] = 1.0
    return t


def tiny_unet(**kw: Any) -> Any:
    """A ~250k-parameter ``UNet2DConditionModel`` for 8x8 single-channel images (one cross-attention level)."""
    from diffusers import UNet2DConditionModel

    cfg: dict[str, Any] = dict(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TOKEN_DIM, attention_head_dim=2, norm_num_groups=8,
    )
    cfg.update(kw)
    return UNet2DConditionModel(**cfg)


@dataclass
class Batch:
    """A denoising batch with its timesteps and noise fixed (so every run sees exactly the same data)."""

    x0: torch.Tensor
    labels: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


@dataclass
class DigitsScenario:
    """Pretrain a class-conditional DDPM UNet on digits 0-8; attack it to generate 9.

    Args:
        timesteps: DDPM training timesteps (linear beta schedule).
        pretrain_steps: Adam steps of pretraining on the digits 0-8.
        batch_size: images per attack batch.
        attack_batches: distinct attack batches (fixed noise and timesteps), cycled in a seeded order.
        eval_repeats: (timestep, noise) draws per held-out image in the evaluation batch.
        seed: model init and data seed.
        model_kwargs: overrides of :func:`tiny_unet`.
    """

    timesteps: int = 100
    pretrain_steps: int = 500
    pretrain_batch_size: int = 64
    pretrain_lr: float = 2e-3
    batch_size: int = 16
    attack_batches: int = 64
    eval_repeats: int = 2
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "digits"
    description: str = "class-conditional DDPM UNet2DConditionModel on 8x8 digits 0-8, attacked to generate the held-out 9"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

    def __post_init__(self) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(num_train_timesteps=self.timesteps)
        x, y = load_digits_tensors()
        g = torch.Generator().manual_seed(self.seed)
        nines = x[y == HELD_OUT][torch.randperm(int((y == HELD_OUT).sum()), generator=g)]
        cut = int(0.8 * len(nines))
        self.pretrain_x, self.pretrain_y = x[y != HELD_OUT], y[y != HELD_OUT]
        self.attack_x, self.eval_x = nines[:cut], nines[cut:]
        self._attack = [self._batch(self.attack_x, self.batch_size, self.seed + 100 + i) for i in range(self.attack_batches)]
        ev = self.eval_x.repeat(self.eval_repeats, 1, 1, 1)
        self._eval = self._batch(ev, len(ev), self.seed + 7, pick=False)

    def _batch(self, images: torch.Tensor, n: int, seed: int, pick: bool = True, labels: torch.Tensor | None = None) -> Batch:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(images), (n,), generator=g) if pick else torch.arange(len(images))
        lab = labels[idx] if labels is not None else torch.full((n,), HELD_OUT)
        return Batch(images[idx], lab, torch.randint(0, self.timesteps, (n,), generator=g),
                     torch.randn(images[idx].shape, generator=g))

    def denoising_loss(self, model: torch.nn.Module, b: Batch) -> torch.Tensor:
        """DDPM epsilon-prediction MSE."""
        p = next(model.parameters())
        x0, noise, t = b.x0.to(p.device, p.dtype), b.noise.to(p.device, p.dtype), b.t.to(p.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = model(noisy, t, encoder_hidden_states=class_tokens(b.labels).to(p.device, p.dtype)).sample
        return torch.nn.functional.mse_loss(pred.float(), noise.float())

    def build_model(self, progress: bool = True) -> torch.nn.Module:
        """The UNet pretrained on digits 0-8 (seeded, deterministic)."""
        torch.manual_seed(self.seed)
        model = tiny_unet(**self.model_kwargs)
        opt = torch.optim.Adam(model.parameters(), lr=self.pretrain_lr)
        model.train()
        bar = tqdm(range(self.pretrain_steps), desc="pretrain digits UNet", unit="step", disable=not progress, leave=False)
        for i in bar:
            b = self._batch(self.pretrain_x, self.pretrain_batch_size, self.seed + 10_000 + i, labels=self.pretrain_y)
            opt.zero_grad(set_to_none=True)
            loss = self.denoising_loss(model, b)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        logger.info("digits scenario: pretrained %d steps, last loss %.4f", self.pretrain_steps, loss.item())
        return model.eval()

    def batches(self, seed: int) -> Iterator[Batch]:
        """Attack batches (9s with fixed noise and timesteps), cycled in a seeded order."""
        return cycle(self._attack, seed)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.denoising_loss(model, batch)

    @torch.no_grad()
    def eval_loss(self, model: torch.nn.Module) -> float:
        """Denoising loss on the held-out 9s (fixed timesteps and noise)."""
        was = model.training
        model.eval()
        try:
            return float(self.denoising_loss(model, self._eval))
        finally:
            model.train(was)

    def probe_inputs(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        p = next(model.parameters())
        b = self._batch(self.eval_x, 4, self.seed + 3)
        return {"sample": self.scheduler.add_noise(b.x0, b.noise, b.t).to(p.device, p.dtype), "timestep": b.t.to(p.device),
                "encoder_hidden_states": class_tokens(torch.arange(4)).to(p.device, p.dtype)}
