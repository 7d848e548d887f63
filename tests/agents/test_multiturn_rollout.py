"""Multi-turn rollouts on the engine's continuation API: a greedy multi-turn rollout gives the
tokens that generating from scratch on the concatenated tokens gives, turn by turn; the
trajectory is the chat template's rendering of the conversation; the engine's log-probs are the
trainer's forward's on the whole trajectory; limits cut and count; a trajectory waiting for its
environment does not hold the others back."""
import os
import time

import pytest
import torch

from agent_models import prompt_item, tiny_llama, word_tokenizer
from fastrlhf.agents.envs import EnvPool
from fastrlhf.agents.rollout import AgentLimits, MultiTurnRollout
from fastrlhf.agents.trajectory import to_rollout_tensors, trajectory_metrics

ENVS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "envs.py")


@pytest.fixture(scope="module")
def setup():
    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    tok = word_tokenizer()
    model = tiny_llama(tok, seed=3)
    return tok, model, HybridEngine(model, tok, EngineConfig())


@pytest.fixture(scope="module")
def higher_lower():
    pool = EnvPool(f"{ENVS}:HigherLower", 1, 30.0)
    yield pool
    pool.shutdown()


def rollout(setup, env, items, limits, **sampling):
    tok, _, engine = setup
    return MultiTurnRollout(engine, tok, env, limits, **sampling).run(items, seeds=0)


def test_a_greedy_multi_turn_rollout_is_what_generating_from_scratch_gives(setup, higher_lower):
    tok, model, _ = setup
    items = [prompt_item(tok, "guess the number"), prompt_item(tok, "guess a number 5 ?")]
    trajs = rollout(setup, higher_lower, items, AgentLimits(max_turns=4, max_new_tokens=6), do_sample=False)
    assert [t.n_turns for t in trajs] == [3, 3] and all(t.done for t in trajs)
    for t in trajs:
        assert t.step_rewards == pytest.approx([1.0, 0.5, 1 / 3])
        starts = [i for i, (g, k) in enumerate(zip(t.generated, t.turn_of)) if g and (i == 0 or t.turn_of[i - 1] != k)]
        for s in starts:   # each model turn, generated from scratch on everything before it (HF generate)
            turn = [tok_id for tok_id, k in zip(t.tokens[s:], t.turn_of[s:]) if k == t.turn_of[s]]
            context = torch.tensor([t.prompt_ids + t.tokens[:s]])
            with torch.no_grad():
                ref = model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=len(turn),
                                     do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            assert ref[0, context.shape[1]:].tolist() == turn
        # the trajectory, token for token, is the chat template's rendering of the whole conversation
        conv = [{"role": "user", "content": items[trajs.index(t)]["prompt_messages"][0]["content"]}]
        for turn in t.turns:
            text = turn["text"] if turn["role"] == "assistant" else ("higher" if len(conv) == 2 else
                                                                     "too low , guess again")
            conv.append({"role": "assistant" if turn["role"] == "assistant" else "user", "content": text})
        rendered = tok.apply_chat_template(conv, tokenize=False)
        want = tok(rendered, add_special_tokens=True)["input_ids"]
        assert t.prompt_ids + t.tokens == want[:len(t.prompt_ids) + len(t.tokens)]
        # what follows is the template's closing of the last assistant message: its EOS unless generated
        assert want[len(t.prompt_ids) + len(t.tokens):] == ([] if t.last_reason == "eos" else [tok.eos_token_id])


def test_turn_by_turn_generation_gives_the_same_trajectories(setup, higher_lower):
    """The path tensor parallelism takes (engine.generate per turn on the whole prefix) and the
    session's continuation give the same greedy trajectories and log-probs."""
    tok, _, engine = setup
    items = [prompt_item(tok, "guess the number"), prompt_item(tok, "go"), prompt_item(tok, "guess a number 5 ?")]
    limits = AgentLimits(max_turns=3, max_new_tokens=5, max_trajectory_tokens=24)
    runs = [MultiTurnRollout(engine, tok, higher_lower, limits, do_sample=False, turn_by_turn=flag).run(items, 0)
            for flag in (False, True)]
    for a, b in zip(*runs):
        assert (a.tokens, a.generated, a.turn_of, a.n_turns, a.cut, a.step_rewards) == \
            (b.tokens, b.generated, b.turn_of, b.n_turns, b.cut, b.step_rewards)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_engine_logprobs_are_the_training_forward_on_the_whole_trajectory(setup, higher_lower):
    from fastrlhf.rlhf.experience import answer_logprobs
    tok, model, _ = setup
    items = [prompt_item(tok, "guess the number"), prompt_item(tok, "guess the number"), prompt_item(tok, "go")]
    trajs = rollout(setup, higher_lower, items, AgentLimits(max_turns=3, max_new_tokens=5), temperature=1.0)
    t = to_rollout_tensors(trajs, tok.pad_token_id)
    assert t["action_mask"].sum() == sum(sum(x.generated) for x in trajs)
    logp = answer_logprobs(model, t["sequences"], t["attention_mask"], t["prompt_len"])
    mask = t["action_mask"] > 0
    assert (logp[mask] - t["engine_logprobs"][mask]).abs().max().item() < 1e-4


def test_limits_cut_and_are_counted(setup):
    tok = setup[0]
    items = [prompt_item(tok, "count", start=9)]
    never_done = EnvPool(f"{ENVS}:Countdown", 1, 30.0)
    long_obs = EnvPool(f"{ENVS}:LongObservation", 1, 30.0)
    try:
        trajs = rollout(setup, never_done, items, AgentLimits(max_turns=2, max_new_tokens=4))
        assert trajs[0].n_turns == 2 and trajs[0].cut == "max_turns" and not trajs[0].done
        assert trajectory_metrics(trajs)["cut_max_turns"] == 1
        # the first message came from reset(): the prompt is rendered from it
        assert trajs[0].prompt_ids == prompt_item(tok, "count 9")["prompt_input_ids"].tolist()
        trajs = rollout(setup, long_obs, items, AgentLimits(max_turns=3, max_new_tokens=4, max_observation_tokens=12))
        env_turns = [(g, n) for g, n in zip(trajs[0].generated, trajs[0].turn_of)]
        assert trajs[0].observations_cut == 2 and trajs[0].observation_tokens == 24
        assert trajs[0].n_turns == 3 and trajs[0].cut == "max_turns" and env_turns
        trajs = rollout(setup, long_obs, items, AgentLimits(max_turns=3, max_new_tokens=4, max_observation_tokens=12,
                                                            max_trajectory_tokens=14))
        assert trajs[0].cut == "trajectory_tokens" and len(trajs[0].tokens) <= 14
    finally:
        never_done.shutdown()
        long_obs.shutdown()


def test_a_trajectory_waiting_for_its_environment_does_not_hold_the_others(setup, monkeypatch):
    """Instance 1 (slow) lives in worker 1, instances 0 and 2 in worker 0 (--env_workers 2): while
    it waits, the engine keeps decoding the other two (a paused sequence holds no decode row)."""
    tok = setup[0]
    items = [prompt_item(tok, "go"), prompt_item(tok, "guess the number", delay=5.0), prompt_item(tok, "go")]
    events = []
    on_turn, on_step = MultiTurnRollout._on_turn_end, MultiTurnRollout._after_step
    monkeypatch.setattr(MultiTurnRollout, "_on_turn_end", lambda self, k, *a: (
        events.append(("turn", k, time.monotonic())), on_turn(self, k, *a))[1])
    monkeypatch.setattr(MultiTurnRollout, "_after_step", lambda self, k, r: (
        events.append(("env", k, time.monotonic())), on_step(self, k, r))[1])
    pool = EnvPool(f"{ENVS}:HigherLower", 2, 30.0)
    try:
        trajs = rollout(setup, pool, items, AgentLimits(max_turns=3, max_new_tokens=4))
    finally:
        pool.shutdown()
    assert [t.n_turns for t in trajs] == [3, 3, 3]
    slow_reply = next(e[2] for e in events if e[:2] == ("env", 1))
    fast_done = [e[2] for e in events if e[0] == "turn" and e[1] != 1]
    # the others went on through later turns while it waited (all of them, unless the machine is very busy)
    assert len(fast_done) == 6 and sum(t < slow_reply for t in fast_done) >= 4


def test_the_rollout_goes_turn_by_turn_where_the_engine_cannot_keep_sessions(setup, monkeypatch):
    """Sessions on one engine: yes; under tensor parallelism (no sessions) or where the ranks must
    step together (ZeRO-3 gathering layer by layer on several ranks: a rank waiting for its
    environment would not): the turn-by-turn path."""
    from types import SimpleNamespace
    import fastrlhf.utils.distributed as dist
    from fastrlhf.agents.rollout import has_sessions
    engine = setup[2]
    assert has_sessions(engine)
    assert not has_sessions(SimpleNamespace(session=engine.session, tp=object(), config=engine.config))
    layered = SimpleNamespace(session=engine.session, tp=None, config=SimpleNamespace(zero3_gather="layer"))
    assert has_sessions(layered)   # one process: nobody to wait for
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert not has_sessions(layered) and has_sessions(engine)
