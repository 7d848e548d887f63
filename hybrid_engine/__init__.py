"""fastrlhf.hybrid_engine: fast generation on the training weights, and kernel injection.

`HybridEngine(model, tokenizer, EngineConfig(...)).generate(...)` -> GenerationOutput;
`HybridEngine.session(...)` -> RolloutSession (sequences that continue after appended tokens);
`inject(model)` makes an HF model's training forward use fastrlhf.ops.
"""
from .arch_spec import ArchSpec, UnsupportedArchitecture, spec_for, supported_model_types
from .engine import HybridEngine, unwrap_model
from .engine_types import EngineConfig, GenerationOutput
from .kv_cache import PagedKVCache
from .session import RolloutSession, SequenceState, TurnEnd


def inject(model, **kwargs):
    from .injection import inject as _inject

    return _inject(model, **kwargs)


__all__ = ["HybridEngine", "EngineConfig", "GenerationOutput", "PagedKVCache", "RolloutSession",
           "SequenceState", "TurnEnd", "ArchSpec",
           "UnsupportedArchitecture", "spec_for", "supported_model_types", "unwrap_model", "inject"]
