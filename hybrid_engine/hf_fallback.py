"""`EngineConfig(fallback="hf")`: plain HF `generate` behind the engine's interface.

For architectures without a spec (or to cross-check the engine). The sampling options map
one to one onto a fresh GenerationConfig (so model-shipped defaults such as top_k=50 do not
leak in); a torch.Generator is turned into a seed for HF's global RNG inside a forked RNG
state, so the caller's global RNG is left as it was.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from transformers import GenerationConfig

from .engine_types import GenerationOutput
from .sampling import SamplingParams


def hf_generate(model, input_ids, attention_mask, max_new: int, params: SamplingParams,
                eos_ids: List[int], pad_id: int, gen: Optional[torch.Generator],
                want_logprobs: bool, num_return_sequences: int = 1) -> GenerationOutput:
    cfg = GenerationConfig(
        max_new_tokens=max_new, min_new_tokens=params.min_new_tokens or None,
        do_sample=params.do_sample, temperature=params.temperature if params.do_sample else None,
        top_k=params.top_k if params.do_sample else None,
        top_p=params.top_p if params.do_sample else None,
        repetition_penalty=params.repetition_penalty, eos_token_id=eos_ids or None,
        pad_token_id=pad_id, return_dict_in_generate=True, output_logits=want_logprobs,
        num_return_sequences=num_return_sequences)
    was_training = model.training
    model.eval()
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if gen is not None:
                seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
                torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=cfg)
    finally:
        model.train(was_training)
    seqs = out.sequences
    logprobs = None
    if want_logprobs:
        new = seqs[:, input_ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1).float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None])[..., 0]
        # zero after a sequence's EOS, like the engine (the EOS token itself keeps its log-prob)
        if eos_ids:
            is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
            after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
            logprobs = logprobs.masked_fill(after, 0.0)
    return GenerationOutput(seqs, logprobs)
