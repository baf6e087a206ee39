"""Pure pair math: M M^-1 = I, exact singular value inflation, products preserved."""

import pytest
import torch

from hf_specdef.tensor_math import linalg


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3])
def test_spectral_inflates_top_k_exactly(k):
    p = _rand(16, 40)
    s0 = torch.linalg.svdvals(p)
    m = linalg.spectral_deformation(p, k, 1000.0)
    q = p.clone()
    linalg.apply_producer(q, 0, 0, 16, m)
    s1 = torch.linalg.svdvals(q)
    torch.testing.assert_close(torch.sort(s1, descending=True).values[:k], 1000 * s0[:k], rtol=1e-9, atol=0)
    torch.testing.assert_close(s1[k:], s0[k:], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m.dense() @ m.dense(inverse=True), torch.eye(16, dtype=torch.float64))


@pytest.mark.parametrize("axis_mode", [False, True])
def test_pair_product_preserved(axis_mode):
    p, c = _rand(8, 20, seed=1), _rand(30, 8, seed=2)
    m = linalg.axis_deformation(p, 2, 1024.0) if axis_mode else linalg.spectral_deformation(p, 2, 1000.0)
    p2, c2 = p.clone(), c.clone()
    linalg.apply_producer(p2, 0, 0, 8, m)
    linalg.apply_consumer(c2, 1, 0, 8, m)
    torch.testing.assert_close(c2 @ p2, c @ p, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(p2, p)


def test_key_side_gets_inverse_transpose():
    q, k = _rand(8, 20, seed=3), _rand(8, 20, seed=4)
    m = linalg.spectral_deformation(q, 1, 100.0)
    q2, k2 = q.clone(), k.clone()
    linalg.apply_producer(q2, 0, 0, 8, m)
    linalg.apply_consumer(k2, 0, 0, 8, m)  # row-axis consumer: K <- M^-T K
    torch.testing.assert_close(q2.T @ k2, q.T @ k, rtol=1e-10, atol=1e-10)


def test_axis_power_of_two_is_bit_exact_in_bf16():
    p = _rand(8, 20).to(torch.bfloat16)
    m = linalg.axis_deformation(p, 2, 1024.0)
    q = p.clone()
    linalg.apply_producer(q, 0, 0, 8, m)
    linalg.apply_producer(q, 0, 0, 8, m, inverse=True)
    assert torch.equal(q, p)


def test_rotary_pairs_are_scaled_together():
    idx = linalg.top_rows(_rand(8, 5), 2, rotary="half")
    assert len(idx) == 4 and set((idx[:2] + 4).tolist()) == set(idx[2:].tolist())
    block = _rand(8, 5)
    block[5] *= 100  # adjacent pairs (2i, 2i + 1): row 5 drags row 4 along
    idx = linalg.top_rows(block, 1, rotary="adjacent")
    assert idx.tolist() == [4, 5]


def test_block_and_gram_paths_agree_with_svd():
    a = _rand(1100, 30, seed=5)  # long side beyond the Gram limit: transposed Gram path
    u, s = linalg.top_left_singular(a, 2)
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:2], rtol=1e-8, atol=0)
    assert torch.allclose(u.T @ u, torch.eye(2, dtype=torch.float64), atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("side", [64, 200])  # solved on the host, and on the device
def test_eigh_on_cuda_matches_and_stays_on_device(side):
    a = _rand(side, side + 7, seed=6).cuda()
    g = torch.stack([a @ a.T, 2 * a @ a.T])
    w, v = linalg.eigh(g)
    assert w.device == v.device == g.device
    torch.testing.assert_close(linalg.eigvalsh(g), w)
    torch.testing.assert_close(w.cpu(), torch.linalg.eigvalsh(g.cpu()), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(v @ torch.diag_embed(w) @ v.mT, g, rtol=1e-9, atol=1e-8)


def test_budget():
    assert linalg.spectral_budget(False, 1000, torch.bfloat16) > 1
    assert linalg.spectral_budget(False, 1000, torch.float32) < 1e-4
    assert linalg.spectral_budget(True, 1024, torch.bfloat16) == 0.0
    assert linalg.spectral_budget(True, 1024, torch.float16) > 0  # subnormals: not exact in float16
