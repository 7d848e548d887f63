"""RewardModel: an HF base model (causal-LM backbone without its LM head) + a scalar value head.

On-disk format (a directory):
    config.json, model.safetensors, ...   the backbone, `save_pretrained` of an `AutoModel`
    value_head.safetensors                `v_head.weight` [1, hidden], `v_head.bias` [1]
    reward_model.json                     {"format": "fastrlhf-reward-model", "version": 1}
`RewardModel.from_pretrained(dir)` loads it. Given a causal-LM dir instead (an SFT checkpoint, a
hub model, or a config-only dir such as the bundled default), the backbone is taken from it and
the head freshly initialised: that is how step 2 and the PPO critic start.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..utils.packing import PackedRows
from .packed_attention import packed_attention, stands_in
from ..utils.positions import position_ids_from_mask
from .loading import load_fastrlhf_lora, load_pretrained, resize_for_tokenizer, torch_dtype
from .paths import REWARD_HEAD_FILE, check_model_path, resolve_model_path

HEAD_FILE = REWARD_HEAD_FILE
META_FILE = "reward_model.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask != 0) position in each row; works for left and right padding."""
    seq_len = attention_mask.shape[-1]
    positions = torch.arange(seq_len, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).amax(-1).clamp(min=0)


def hidden_size_of(config) -> int:
    # OPT projects the decoder output to word_embed_proj_dim before the LM head
    for name in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError(f"cannot tell the hidden size of {type(config).__name__}")


class RewardModel(nn.Module):
    """`forward` -> per-token values [B, S] (fp32, the critic's view); `score` -> [B] (reward)."""

    def __init__(self, backbone: nn.Module, v_head: Optional[nn.Linear] = None, head_seed: int = 1234):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        if v_head is None:
            v_head = nn.Linear(hidden_size_of(self.config), 1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(head_seed)
                # small init: initial scores near 0 so the pairwise loss starts at log 2
                nn.init.normal_(v_head.weight, std=1.0 / (hidden_size_of(self.config) + 1) ** 0.5 * 0.1)
                nn.init.zeros_(v_head.bias)
        self.v_head = v_head.to(dtype=next(backbone.parameters()).dtype)
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                packed: bool = False, shared_prefix: int = 0) -> torch.Tensor:
        """Per-token values [B, S]. packed=True runs the backbone on the real tokens only, packed
        into one row with restarting positions (`utils.packing`); padding then gets 0. With
        shared_prefix P, rows whose first P columns are equal run them once (where the packed
        attention can stand in for the backbone's); same values."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if packed:
            if not self._takes_position_ids:
                raise ValueError(f"{type(self.backbone).__name__} takes no position_ids, so it cannot run "
                                 "packed sequences; drop --packing")
            share = shared_prefix if shared_prefix > 0 and stands_in(self.backbone) else 0
            rows = PackedRows.of(attention_mask, input_ids, share)
            with packed_attention(self.backbone, rows):
                hidden = self.backbone(input_ids=rows.pack(input_ids), position_ids=rows.position_ids,
                                       use_cache=False)[0]
            return rows.unpack(self.v_head(hidden).squeeze(-1).float())
        kwargs: Dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._takes_position_ids:
            # positions count real tokens only, so a left-padded row scores like its right-padded twin
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        hidden = self.backbone(**kwargs)[0]  # last_hidden_state
        return self.v_head(hidden).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        values = self.forward(input_ids, attention_mask)
        idx = last_token_index(attention_mask)
        return values.gather(1, idx.unsqueeze(1)).squeeze(1)

    def save_pretrained(self, path: str, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                        safe_serialization: bool = True) -> None:
        """Write the documented format; `state_dict` (keys `backbone.*`, `v_head.*`) overrides the
        live weights, e.g. a ZeRO-3 gathered copy."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(path, state_dict=backbone_sd, safe_serialization=safe_serialization)
        head = {"v_head.weight": sd["v_head.weight"].detach().float().contiguous().cpu(),
                "v_head.bias": sd["v_head.bias"].detach().float().contiguous().cpu()}
        save_file(head, os.path.join(path, HEAD_FILE))
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump({"format": "fastrlhf-reward-model", "version": 1,
                       "backbone_class": type(self.backbone).__name__}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path_or_name: Optional[str] = None, *, tokenizer=None, dtype: str = "fp32",
                        seed: int = 1234, ds_config: Optional[Dict[str, Any]] = None) -> "RewardModel":
        """A saved reward model, or a fresh head on the backbone of any causal-LM dir/name."""
        from transformers import AutoModel
        path = resolve_model_path(path_or_name)
        check_model_path(path, "any")
        backbone = load_pretrained(AutoModel, path, dtype=torch_dtype(dtype), seed=seed, ds_config=ds_config)
        resize_for_tokenizer(backbone, tokenizer, seed)
        load_fastrlhf_lora(backbone, path)  # saved with merge_lora_on_save=False
        model = cls(backbone, head_seed=seed)
        head_file = os.path.join(path, HEAD_FILE)
        if os.path.isfile(head_file):
            from safetensors.torch import load_file
            head = load_file(head_file)
            with torch.no_grad():
                model.v_head.weight.copy_(head["v_head.weight"])
                model.v_head.bias.copy_(head["v_head.bias"])
        return model

    @staticmethod
    def is_reward_model_dir(path: str) -> bool:
        return os.path.isfile(os.path.join(path, HEAD_FILE))
