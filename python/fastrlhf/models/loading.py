"""Loading tokenizers and causal LMs the way every fastrlhf step needs them.

`model_name_or_path` may be (`models.paths.check_model_path` checks it first)
  - None: the bundled tiny default (`fastrlhf.tasks.default_task.default_model_dir()`), built
    from its config with a seed (no weights are shipped);
  - an HF hub name or a local dir with weights (`from_pretrained`);
  - a local dir holding only a config.json (built from the config with a seed);
  - a PEFT adapter dir (adapter_config.json: the base model is loaded, then the adapter);
  - a fastrlhf checkpoint saved with unmerged LoRA (fastrlhf_lora.json next to the weights).
Tokenizers get a pad token when they have none, and the model's embeddings are then resized
to a multiple of 8 (tensor-core friendly).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import weakref
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import ConfigError
from . import lora as fl_lora
from .paths import check_model_path, resolve_model_path

PAD_TOKEN = "<|pad|>"
LORA_CONFIG_FILE = "fastrlhf_lora.json"
LORA_WEIGHTS_FILE = "fastrlhf_lora.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_dtype_kwargs(dtype: torch.dtype) -> Dict[str, torch.dtype]:
    """The dtype keyword for HF `from_pretrained`/`from_config`: `dtype` since transformers 4.56,
    `torch_dtype` before (older releases hand an unknown `dtype=` to the model's __init__)."""
    return {_hf_dtype_keyword(): dtype}


@functools.lru_cache(maxsize=None)
def _hf_dtype_keyword() -> str:
    import transformers
    from packaging.version import Version
    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: Optional[str] = None, *, padding_side: str = "right"):
    """AutoTokenizer for `path` (None = bundled default) with a pad token guaranteed."""
    from transformers import AutoTokenizer
    path = resolve_model_path(path)
    check_model_path(path, "tokenizer")
    adapter = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter) and not glob.glob(os.path.join(path, "tokenizer*")):
        path = _adapter_base(path)  # PEFT adapter dirs usually carry no tokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = padding_side
    return tok


def _adapter_base(adapter_dir: str) -> str:
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}/adapter_config.json has no base_model_name_or_path; "
                         "load the base model yourself and pass a PeftModel")
    return base


def has_weights(path: str) -> bool:
    """False only for a local dir that holds a config but no weight files."""
    if not os.path.isdir(path):
        return True  # a hub name
    patterns = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")
    found = [p for pat in patterns for p in glob.glob(os.path.join(path, pat))
             if os.path.basename(p) not in (LORA_WEIGHTS_FILE, "value_head.safetensors")]
    return bool(found)


# transformers reads ZeRO-3 (partition at load, gather to resize embeddings) from a weak reference
# to the last HfDeepSpeedConfig made: each model loaded partitioned keeps its own alive here, for
# as long as the model lives (a weak-keyed map, rather than an attribute stuck on the model)
_PARTITIONED_AT_LOAD: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _zero3_loading_context(ds_config: Optional[Dict[str, Any]]):
    """The HfDeepSpeedConfig that makes from_pretrained partition the weights, for a ZeRO-3 ds_config."""
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig
        return HfDeepSpeedConfig(ds_config)
    return None


def _no_zero3_init():
    """Building from a config inside deepspeed.zero.Init fails (DESIGN.md), so make sure no stale
    HfDeepSpeedConfig from an earlier step turns it on."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
    except ImportError:  # older transformers
        pass


def build_from_config(auto_cls, path: str, dtype: torch.dtype, seed: int):
    from transformers import AutoConfig
    _no_zero3_init()
    config = AutoConfig.from_pretrained(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same weights on every rank and every run
        model = auto_cls.from_config(config, **hf_dtype_kwargs(dtype))
    return model


def load_pretrained(auto_cls, path: str, *, dtype: torch.dtype, seed: int,
                    ds_config: Optional[Dict[str, Any]] = None):
    """`auto_cls.from_pretrained(path)` or, for a config-only dir, `from_config` with `seed`."""
    if not has_weights(path):
        return build_from_config(auto_cls, path, dtype, seed)
    hf_ds = _zero3_loading_context(ds_config)
    if hf_ds is None:
        _no_zero3_init()
    model = auto_cls.from_pretrained(path, **hf_dtype_kwargs(dtype))
    if hf_ds is not None:
        _PARTITIONED_AT_LOAD[model] = hf_ds
    return model


def resize_for_tokenizer(model: nn.Module, tokenizer, seed: int = 1234) -> None:
    """Grow the embeddings (to a multiple of 8) when the tokenizer has more tokens than the model.
    The new rows are sampled, so seed them: every rank and every run must get the same model."""
    if tokenizer is None:
        return
    emb = model.get_input_embeddings()
    rows = emb.weight.shape[0] if emb.weight.dim() == 2 and emb.weight.numel() else getattr(
        model.config, "vocab_size", 0)
    if len(tokenizer) > rows:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(path: Optional[str] = None, *, tokenizer=None, dtype: str = "fp32", seed: int = 1234,
                   ds_config: Optional[Dict[str, Any]] = None, gradient_checkpointing: bool = False,
                   trainable_adapter: bool = True) -> nn.Module:
    """A causal LM ready for training (see the module docstring for what `path` may be)."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(path)
    check_model_path(path, "policy")
    tdtype = torch_dtype(dtype)
    adapter_cfg = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_cfg):
        from peft import PeftModel
        base = load_pretrained(AutoModelForCausalLM, _adapter_base(path), dtype=tdtype, seed=seed,
                               ds_config=ds_config)
        resize_for_tokenizer(base, tokenizer, seed)
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable_adapter)
    else:
        model = load_pretrained(AutoModelForCausalLM, path, dtype=tdtype, seed=seed, ds_config=ds_config)
        resize_for_tokenizer(model, tokenizer, seed)
        load_fastrlhf_lora(model, path)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    # non-reentrant checkpointing also works when the inputs need no grad (frozen base + LoRA)
    if hasattr(model, "backbone") and hasattr(model, "v_head"):  # RewardModel: its HF backbone
        model = model.backbone
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = False


def disable_dropout(model: nn.Module) -> None:
    """RL and DPO need the same function at rollout/reference and update time (and bit-equal
    resume), so every dropout is switched off, including the functional ones HF reads from
    attributes."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout", "attn_dropout",
                     "resid_dropout", "hidden_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def max_positions(config) -> Optional[int]:
    """The longest sequence a model config allows (the key differs by family), or None."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora_from_config(model: nn.Module, cfg) -> nn.Module:
    """fastrlhf LoRA per cfg.lora_* (skipped for PEFT models, which carry their own adapters)."""
    if is_peft_model(model):
        if cfg.lora_rank > 0:
            raise ConfigError("the model already has PEFT LoRA adapters; drop --lora_rank (0) or pass the "
                              "plain base model")
        return model
    if cfg.lora_rank > 0:
        try:
            fl_lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        except ValueError as e:  # no layer matched --lora_target_modules: the message lists the names
            raise ConfigError(f"--lora_target_modules: {e}") from None
        if cfg.only_optimize_lora:
            fl_lora.only_optimize_lora(model)
    elif cfg.only_optimize_lora:
        raise ConfigError("only_optimize_lora needs LoRA: set --lora_rank > 0")
    return model


def save_fastrlhf_lora(state_dict: Dict[str, torch.Tensor], lora_meta: Dict[str, Dict[str, float]],
                       out_dir: str) -> None:
    """Unmerged fastrlhf LoRA: the lora_a/lora_b tensors and their (r, alpha) per module."""
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in state_dict.items() if k.endswith((".lora_a", ".lora_b"))}
    save_file(tensors, os.path.join(out_dir, LORA_WEIGHTS_FILE))
    with open(os.path.join(out_dir, LORA_CONFIG_FILE), "w") as f:
        json.dump({"modules": lora_meta}, f, indent=1)


def load_fastrlhf_lora(model: nn.Module, path: str) -> bool:
    """Re-apply unmerged fastrlhf LoRA saved by save_fastrlhf_lora (True when there was some)."""
    meta_file = os.path.join(path, LORA_CONFIG_FILE)
    if not os.path.isfile(meta_file):
        return False
    from safetensors.torch import load_file
    with open(meta_file) as f:
        modules = json.load(f)["modules"]
    for name, m in modules.items():
        fl_lora.apply_lora(model, int(m["r"]), float(m["alpha"]), 0.0, [name.replace(".", r"\.")])
    tensors = load_file(os.path.join(path, LORA_WEIGHTS_FILE))
    missing = set(tensors) - set(dict(model.named_parameters()))
    if missing:
        raise ValueError(f"{path}: LoRA tensors {sorted(missing)[:3]} do not match the model's modules")
    model.load_state_dict(tensors, strict=False)
    return True
