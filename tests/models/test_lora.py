import torch
from torch import nn

from fastrlhf.models.lora import LoRALinear, apply_lora, merge_lora, only_optimize_lora


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 21), nn.ReLU(), nn.Linear(21, 7))


def test_lora_starts_as_identity_update_and_merges_exactly_in_fp64():
    m = _mlp().double()
    x = torch.randn(4, 13, dtype=torch.float64)
    ref = m(x)
    names = apply_lora(m, r=4, alpha=8, target_modules=[r"\d+"])
    assert names == ["0", "2"]
    assert torch.allclose(m(x), ref)  # B starts at zero
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            nn.init.normal_(mod.lora_b)
    y = m(x)
    assert not torch.allclose(y, ref)
    n = only_optimize_lora(m)
    assert n == 4 * 13 + 21 * 4 + 4 * 21 + 7 * 4
    merge_lora(m)
    assert all(type(mod) is nn.Linear for mod in (m[0], m[2]))
    assert torch.allclose(m(x), y, atol=1e-10)


def test_apply_lora_no_match_names_the_layers():
    import pytest
    with pytest.raises(ValueError, match="linear layers are named"):
        apply_lora(_mlp(), r=2, target_modules=["q_proj"])
