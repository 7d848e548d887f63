"""Loading tokenizers and causal LMs the way every fastrlhf step needs them.

`model_name_or_path` may be
  - None: the bundled tiny default (`fastrlhf.data.default_task.default_model_dir()`), built
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
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..config import ConfigError
from . import lora as fl_lora

PAD_TOKEN = "<|pad|>"
LORA_CONFIG_FILE = "fastrlhf_lora.json"
LORA_WEIGHTS_FILE = "fastrlhf_lora.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_model_dir() -> str:
    try:
        from ..data.default_task import default_model_dir as data_default_dir
    except ImportError as e:
        raise RuntimeError("the bundled default model (fastrlhf.data.default_task) is not available; "
                           "pass --model_name_or_path") from e
    return str(data_default_dir())


def resolve_model_path(path: Optional[str]) -> str:
    return str(path) if path else default_model_dir()


# ----------------------------------------------------------------------------- the check at load

class ModelPathError(ConfigError):
    """A model path that cannot be what it is asked to be: missing, empty, a run rather than a
    model, the wrong kind of model, or a hub name that cannot be reached. `path` is the path."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path


# what each expected kind is, in words, for the messages
MODEL_KINDS = {
    "policy": "a causal LM (a base model, or the output of `fastrlhf sft`)",
    "reward": "a reward model (the output of `fastrlhf rm`: config.json + value_head.safetensors)",
    "any": "a model dir (config.json + weights)",
    "tokenizer": "a tokenizer (a model dir with tokenizer files, or a tokenizer dir)",
}
REWARD_HEAD_FILE = "value_head.safetensors"  # models/reward.py's HEAD_FILE (reward.py imports this module)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model")


def model_dir_kind(path: str) -> str:
    """What a local dir holds: 'reward' (a fastrlhf reward model), 'policy' (an HF causal LM or a
    PEFT adapter), 'run' (no model at its root, but model subdirs), 'empty' or 'other'."""
    if os.path.isfile(os.path.join(path, REWARD_HEAD_FILE)):
        return "reward"
    if os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "policy"
    if model_subdirs(path):
        return "run"
    return "empty" if not os.listdir(path) else "other"


def model_subdirs(path: str) -> Dict[str, str]:
    """{subdir name: its kind} of the immediate subdirs of `path` that hold a model
    (a run's actor/, critic/, checkpoint-<step>/, a pipeline's step1_sft/ ...)."""
    found = {}
    try:
        names = sorted(os.listdir(path), key=_natural_key)
    except OSError:
        return found
    for name in names:
        sub = os.path.join(path, name)
        if os.path.isdir(sub) and not name.endswith(".partial"):
            if os.path.isfile(os.path.join(sub, REWARD_HEAD_FILE)):
                found[name] = "reward"
            elif os.path.isfile(os.path.join(sub, "config.json")) or os.path.isfile(
                    os.path.join(sub, "adapter_config.json")):
                found[name] = "policy"
    return found


def _natural_key(name: str):
    import re
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _has_tokenizer_files(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json")) or any(
        os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def _hub_offline() -> bool:
    truthy = ("1", "on", "yes", "true")
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _is_hub_name(path: str) -> bool:
    """Could `path` be a hub repo id ('gpt2', 'org/name')? Paths like './x', '/a/b', 'a/b/c' cannot,
    nor 'runs/x' when there is a local dir runs/ (a typo in a local path, not a hub name)."""
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return False
    if "/" in path and os.path.isdir(path.split("/")[0]):
        return False
    try:
        from huggingface_hub.utils import validate_repo_id
        validate_repo_id(path)
    except ImportError:
        return True
    except Exception:  # HFValidationError
        return False
    return True


def _check_hub_name(path: str, what: str) -> None:
    """A hub name must be in the local HF cache when offline, and reachable otherwise."""
    from huggingface_hub import try_to_load_from_cache
    cached = any(isinstance(try_to_load_from_cache(path, f), str) for f in ("config.json", "adapter_config.json"))
    if cached:
        return
    if _hub_offline():
        raise ModelPathError(
            f"{what}{path!r} is not a local directory, and as a hub model it is not in the local "
            f"HF cache while the hub is offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set). Fix: check the path, "
            f"or download the model where there is network (`hf download {path}`) and copy the cache", path=path)
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(path, "config.json")
    except Exception as e:  # network failure, unknown repo, gated repo, adapter-only repo
        name = type(e).__name__
        if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            return  # the repo exists (e.g. a PEFT adapter without config.json); loading takes it from here
        if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            why = f"the hub has no model {path!r} you can access ({name})"
        else:
            why = f"the hub could not be reached ({name})"
        raise ModelPathError(f"{what}{path!r} is not a local directory, and {why}. Fix: check the "
                             f"path or the model name, your network, or set HF_HUB_OFFLINE=1 to use only the "
                             f"local HF cache", path=path) from None


def check_model_path(path: Optional[str], expect: str = "any", *, option: Optional[str] = None,
                     tokenizer: bool = False) -> None:
    """The one check every model path gets before anything loads from it; raises ModelPathError
    (a ConfigError) saying what was expected and what was found.

    `expect`: 'policy' (a causal LM: an SFT model, an actor, a reference), 'reward' (a step-2
    reward model dir), 'any' (a backbone to start from) or 'tokenizer' (a dir with tokenizer files,
    or a model dir that has them). `option` names the flag in messages. `tokenizer=True` also
    requires tokenizer files in a local model dir (a PEFT adapter dir borrows its base model's).
    None (the bundled default) always passes, except as a reward model."""
    if expect not in MODEL_KINDS:
        raise ValueError(f"expect must be one of {', '.join(MODEL_KINDS)}, got {expect!r}")
    if expect == "tokenizer":
        if path and os.path.isdir(path) and _has_tokenizer_files(path):
            return
        tokenizer = True
    what = f"{option} " if option else ""
    expected = MODEL_KINDS[expect]
    if not path:
        if expect == "reward":
            raise ModelPathError(f"{what}is not set; it must be {expected}", path=path)
        return
    path = str(path)
    if not os.path.exists(path):
        if expect == "reward":
            raise ModelPathError(f"{what}{path!r}: no such directory; it must be {expected}", path=path)
        if _is_hub_name(path):
            _check_hub_name(path, what)
            return
        parent = os.path.dirname(os.path.normpath(path)) or "."
        where = "" if os.path.isdir(parent) else f" (nor does {parent}/)"
        raise ModelPathError(f"{what}{path!r}: no such directory{where}; it must be {expected}. Fix: check the "
                             f"path (relative paths are taken from {os.getcwd()})", path=path)
    if not os.path.isdir(path):
        raise ModelPathError(f"{what}{path!r} is a file; it must be {expected}, a directory", path=path)
    kind = model_dir_kind(path)
    if kind == "empty":
        raise ModelPathError(f"{what}{path!r} is an empty directory; it must be {expected}", path=path)
    if kind == "other":
        names = sorted(os.listdir(path))
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ModelPathError(f"{what}{path!r} holds no model (no config.json; it has {shown}); it must be "
                             f"{expected}", path=path)
    if kind == "run":
        subdirs = model_subdirs(path)
        listed = ", ".join(f"{name}/" + (" (reward model)" if k == "reward" else "") for name, k in subdirs.items())
        # a run's critic/ has the reward-model format but is a value function, never the reward model
        fits = [n for n, k in subdirs.items() if expect == "any" or (k == expect and not n.startswith("critic"))]
        pick = "actor" if "actor" in fits and expect != "reward" else (fits[0] if fits else None)
        fix = f" Fix: pass {os.path.join(path, pick)}" if pick else ""
        raise ModelPathError(f"{what}{path!r} holds a training run, not a model: its model subdirs are {listed}; "
                             f"it must be {expected}.{fix}", path=path)
    if expect == "reward" and kind != "reward":
        raise ModelPathError(f"{what}{path!r} is a causal LM (policy), not a reward model: it has no "
                             f"{REWARD_HEAD_FILE}, so its scores would come from a random value head; it must be "
                             f"{expected}", path=path)
    if expect == "policy" and kind == "reward":
        raise ModelPathError(f"{what}{path!r} is a reward model ({REWARD_HEAD_FILE}), not a causal LM: its backbone "
                             f"has no trained LM head; it must be {expected}", path=path)
    if tokenizer and not _has_tokenizer_files(path):
        raise ModelPathError(f"{what}{path!r} has a model but no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, "
                             f"...). Fix: pass --tokenizer NAME_OR_DIR, or save the tokenizer into that dir", path=path)


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


def _zero3_loading_context(ds_config: Optional[Dict[str, Any]]):
    """Keeps an HfDeepSpeedConfig alive during from_pretrained (returned so the caller holds it)."""
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
        object.__setattr__(model, "_fastrlhf_hf_ds_config", hf_ds)
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
