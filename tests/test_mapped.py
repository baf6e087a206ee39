"""Memory-mapped weights get a private copy before protection writes them (hf_specdef.storage.memory_mapped)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from hf_specdef import SpecDefConfig
from hf_specdef.analysis.probe import max_relative_deviation
from hf_specdef.integrations.transformers import SpecDefQuantizationConfig
from hf_specdef.storage import memory_mapped as mapped

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/maps"),
                           reason="file mappings are read from /proc/self/maps")
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def in_file_mapping(t: torch.Tensor) -> bool:
    ranges = mapped.file_backed_ranges()
    return any(a <= t.data_ptr() < b for a, b in ranges)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mapped") / "tiny-llama"
    tiny_llama(seed=0).save_pretrained(path)
    return path


def test_file_backed_ranges_parses_paths_only(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/python\n"
                    "7f00a0000000-7f00a0021000 rw-p 00000000 00:00 0 \n"
                    "7ffd5a6b2000-7ffd5a6d3000 rw-p 00000000 00:00 0                  [stack]\n"
                    "00300000-00301000 rw-p 00000000 fe:00 3014919 /tmp/x/model.safetensors\n")
    assert mapped.file_backed_ranges(str(maps)) == [(0x300000, 0x301000), (0x400000, 0x452000)]
    assert mapped.file_backed_ranges(str(tmp_path / "missing")) is None


@linux
def test_loaded_weights_are_copied_once_and_keep_their_values(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    params = dict(model.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    param, before = params[name], params[name].detach().clone()
    assert in_file_mapping(param), "transformers no longer memory-maps safetensors: the copy is moot"
    tensors = {name: param.data}
    copied = mapped.own_file_backed(tensors, [name, name])
    assert copied == param.nbytes
    assert not in_file_mapping(tensors[name])
    assert torch.equal(tensors[name], before)
    assert mapped.own_file_backed(tensors, [name]) == 0  # already private


def test_private_and_shared_tensors_are_left_alone():
    base = torch.randn(8, 8)
    tensors = {"fresh": torch.randn(4, 4), "view": base[:4]}
    ptrs = {k: v.data_ptr() for k, v in tensors.items()}
    assert mapped.own_file_backed(tensors, tensors) == 0
    assert {k: v.data_ptr() for k, v in tensors.items()} == ptrs


@linux
def test_load_time_protection_writes_private_copies(checkpoint):
    cfg = SpecDefConfig(alpha=1000.0, mode="spectral", precision="refuse")
    plain = AutoModelForCausalLM.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, specdef_config=SpecDefQuantizationConfig(cfg))
    deformed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(plain.named_parameters())[n])]
    assert len(deformed) >= 8
    params = dict(model.named_parameters())
    assert not any(in_file_mapping(params[n]) for n in deformed)
    assert isinstance(params[deformed[0]], torch.nn.Parameter)
    with torch.no_grad():
        assert max_relative_deviation(plain(IDS).logits, model(IDS).logits) <= cfg.tolerance
