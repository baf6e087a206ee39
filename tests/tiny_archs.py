"""Tiny models of the registered architectures, built from configs (no Hub downloads), as transformers' own tests do.

Norm weights and biases are randomised (as after training) so that norm folds are not trivial.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _finish(model: torch.nn.Module, offset_norms: bool = False) -> torch.nn.Module:
    """Randomise every norm weight (around 1, or around 0 for ``1 + w`` norms) and bias."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and name.endswith("bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_qwen3(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return _finish(Qwen3ForCausalLM(Qwen3Config(**COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16)))


def tiny_gemma(seed: int = 0) -> torch.nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    return _finish(GemmaForCausalLM(GemmaConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16)))


def tiny_gemma2(seed: int = 0) -> torch.nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    return _finish(Gemma2ForCausalLM(Gemma2Config(**COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16,
                                                  sliding_window=8, query_pre_attn_scalar=16)))


def tiny_gemma3(seed: int = 0) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    return _finish(Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16,
                                                      sliding_window=8, query_pre_attn_scalar=16)))


def tiny_phi3(seed: int = 0) -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)  # partial rotary as in Phi-4-mini
    return _finish(Phi3ForCausalLM(Phi3Config(**COMMON, intermediate_size=96, num_key_value_heads=2,
                                              partial_rotary_factor=0.75, pad_token_id=0, bos_token_id=0,
                                              eos_token_id=0)))


def tiny_gpt_neox(seed: int = 0) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)  # rotary on a quarter of each head (Pythia), parallel residual
    return _finish(GPTNeoXForCausalLM(GPTNeoXConfig(**COMMON, intermediate_size=128, rotary_pct=0.25,
                                                    use_parallel_residual=True, bos_token_id=0, eos_token_id=0)))


def tiny_opt(seed: int = 0, **kw) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    common = {**COMMON, "max_position_embeddings": 64}
    return _finish(OPTForCausalLM(OPTConfig(**common, ffn_dim=128, bos_token_id=0, eos_token_id=0, pad_token_id=1, **kw)))


MOE = dict(intermediate_size=96, num_key_value_heads=2, num_experts_per_tok=2)


def tiny_mixtral(seed: int = 0) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    return _finish(MixtralForCausalLM(MixtralConfig(**COMMON, **MOE, num_local_experts=4)))


def tiny_qwen2_moe(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)  # layer 1 dense (mlp_only_layers), a shared expert with its gate
    return _finish(Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, **MOE, num_experts=4, moe_intermediate_size=48,
                                                      shared_expert_intermediate_size=80, mlp_only_layers=[1])))


def tiny_qwen3_moe(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return _finish(Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, **MOE, num_experts=4, moe_intermediate_size=48,
                                                      head_dim=16)))


TINY_ARCHS: dict[str, Callable[..., torch.nn.Module]] = {
    "qwen3": tiny_qwen3,
    "gemma": tiny_gemma,
    "gemma2": tiny_gemma2,
    "gemma3_text": tiny_gemma3,
    "phi3": tiny_phi3,
    "gpt_neox": tiny_gpt_neox,
    "opt": tiny_opt,
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
    "qwen3_moe": tiny_qwen3_moe,
}


# --------------------------------------------------------------------------------------------
# diffusers MMDiT denoisers (SD3, SD3.5 with q/k norms and a dual-attention block, Flux)
# --------------------------------------------------------------------------------------------

_MMDIT = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16)


def tiny_sd3(seed: int = 0, **kw) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)  # the last block is context_pre_only (no to_add_out, AdaLayerNormContinuous context norm)
    return _finish(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                         caption_projection_dim=32, pos_embed_max_size=8, **_MMDIT, **kw))


def tiny_sd35(seed: int = 0) -> torch.nn.Module:
    return tiny_sd3(seed, qk_norm="rms_norm", dual_attention_layers=(0,))


def tiny_flux(seed: int = 0) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _finish(FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                          axes_dims_rope=(4, 6, 6), guidance_embeds=True, **_MMDIT))


TINY_DENOISERS: dict[str, Callable[..., torch.nn.Module]] = {"sd3": tiny_sd3, "sd35": tiny_sd35, "flux": tiny_flux}
