"""Fast ``inspect``: float32 top-k singular values where their error estimate allows, float64 otherwise;
one read per tensor, several tensors at a time; the report agrees with the float64 computation it replaced."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from hf_specdef import SpecDefConfig, inspect_model, protect
from hf_specdef.analysis.inspection import _TOP, RTOL, inspect_tensors
from hf_specdef.tensor_math import linalg


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_matrix_evidence(w: torch.Tensor) -> tuple[list[float], dict[str, float]]:
    """What inspect computed before: everything in float64 (singular values by a full SVD here)."""
    a = w.detach().double()
    s = torch.linalg.svdvals(a)[:min(_TOP, min(a.shape))]
    ev = {"top_gap": float((s[:-1] / s[1:]).max())} if s.numel() > 1 else {}
    for axis, label in ((1, "row"), (0, "col")):
        norms = a.norm(dim=axis)
        med = norms.median()
        ev[f"{label}_high"], ev[f"{label}_low"] = float(norms.max() / med), float(med / norms.min())
    return s.tolist(), ev


@pytest.mark.parametrize("shape", [(48, 200), (300, 40), (64, 64)])
@pytest.mark.parametrize("deformed", [False, True])
def test_top_singular_values_within_rtol(shape, deformed):
    w = _rand(*shape, seed=1)
    if deformed:  # one direction inflated by 1000: too ill-conditioned for float32, recomputed in float64
        u = torch.linalg.svd(w.double(), full_matrices=False)[0][:, :1].float()
        w = w + 999.0 * u @ (u.T @ w)
    exact = torch.linalg.svdvals(w.double())[:32]
    got = linalg.top_singular_values(w, 32, rtol=RTOL)
    assert got.dtype == torch.float64 and got.shape == exact.shape
    torch.testing.assert_close(got, exact, rtol=RTOL, atol=0)
    torch.testing.assert_close(linalg.top_singular_values(w, 32), exact, rtol=1e-10, atol=0)  # float64 path
    if deformed:  # the float32 path could not have given the small ones within RTOL: the fallback was taken
        g32 = linalg.gram_of_short_side(w, torch.float32)
        fast = torch.linalg.eigvalsh(g32).flip(0)[:32].clamp_min(0).sqrt().double()
        assert not torch.allclose(fast, exact, rtol=RTOL, atol=0)
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=0)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_report_agrees_with_the_float64_computation(build):
    original = build()
    protected = copy.deepcopy(original)
    protect(protected, SpecDefConfig(alpha=1000.0), progress=False)
    for model in (original, protected):
        params = dict(model.named_parameters())
        report = inspect_model(model)
        assert report.findings
        for f in report.findings:
            top, ev = reference_matrix_evidence(params[f.name])
            torch.testing.assert_close(torch.tensor(f.top_singular_values), torch.tensor(top), rtol=RTOL, atol=0)
            for key, value in ev.items():
                assert f.evidence[key] == pytest.approx(value, rel=RTOL), (f.name, key)
    assert inspect_model(original).deformed == []
    assert len(inspect_model(protected).deformed) > 0


def test_parallel_and_grouped_work_gives_the_same_report():
    model = tiny_llama()
    protect(model, SpecDefConfig(alpha=1000.0, sites=("attn.vo", "mlp")), progress=False)
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    reads: list[str] = []

    def get(name: str) -> torch.Tensor:
        reads.append(name)
        return params[name].data

    one = inspect_tensors(shapes, get, model.config, type(model).__name__, workers=1)
    names = sorted(n for n in shapes if len(shapes[n]) == 2 and n.endswith("weight"))
    assert sorted(reads) == names  # every weight read exactly once
    done, groups_done = [], []
    many = inspect_tensors(shapes, get, model.config, type(model).__name__, workers=3,
                           groups=[names[::2], names[1::2]], done=done.append, group_done=groups_done.append)
    assert one.to_dict() == many.to_dict()
    assert sorted(done) == names and groups_done == [0, 1]
