"""The bundled calculator task: the generator reproduces the shipped files; the SFT
demonstrations are rendered exactly as the tool environment renders a trajectory (so RL continues
what SFT taught, token for token); a tool call decodes to valid JSON the calculator answers; the
exact reward wants a #### answer; `fastrlhf train --task calculator` wires SFT then GRPO with the
tool; the held-out evaluation runs multi-turn."""
import filecmp
import json
import os

import pytest

from fastrlhf.tasks import calculator_task as ct


@pytest.fixture(scope="module")
def tok():
    from fastrlhf.models.loading import load_tokenizer
    return load_tokenizer(ct.calculator_model_dir(), padding_side="left")


def test_the_generator_reproduces_the_shipped_files(tmp_path):
    ct.write_calculator_task(str(tmp_path))
    shipped = ct.calculator_model_dir()
    for name in (ct.SFT_FILE, ct.RL_FILE, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "config.json"):
        assert filecmp.cmp(tmp_path / name, os.path.join(shipped, name), shallow=False), name


def test_demonstrations_are_what_the_tool_environment_renders(tok):
    from fastrlhf.agents import calculator
    from fastrlhf.agents.render import TurnRenderer
    from fastrlhf.agents.tools import parse_tool_calls, tool_schema
    rows = [json.loads(line) for _, line in zip(range(40), open(ct.calculator_data_paths()["sft"]))]
    renderer = TurnRenderer(tok)
    schema = [tool_schema(calculator)]
    assert renderer.renders_tools(schema)   # the template's own tool format, not the plain block
    for first, second in zip(rows[0::2], rows[1::2]):
        question = first["prompt"].split("Human: ")[1].split("\n\n")[0]
        # RL's prompt: the question rendered with the calculator's full schema = SFT's first prompt
        prompt = renderer.prompt_text([{"role": "user", "content": question}], "", schema)
        assert prompt == first["prompt"]
        call = first["response"]
        (parsed,) = parse_tool_calls(tok.decode(tok(call, add_special_tokens=False)["input_ids"]))
        result = calculator(**parsed.arguments)
        # RL's trajectory after the call: the model's tokens + EOS, then the tool turn as the environment
        # renders and tokenizes it = SFT's second prompt, token for token
        rl = (renderer.encode_prompt(prompt) + tok(call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
              + renderer.turn_ids([("tool", result)], model_closed=True, budget=64)[0])
        assert rl == renderer.encode_prompt(second["prompt"])


def test_the_shipped_demonstrations_have_slips_at_the_stated_rate():
    rows = [json.loads(line) for line in open(ct.calculator_data_paths()["sft"])]
    firsts, seconds = rows[0::2], rows[1::2]
    problems = ct.generate_problems()
    assert len(firsts) == len(problems) // 2
    wrong = 0
    for p, second in zip(problems, seconds):
        wrong += second["response"] != f"#### {p['answer']}"
    assert 0.2 < wrong / len(seconds) < 0.4   # SLIP_RATE 0.3: every slip makes the final answer wrong


def test_the_calculator_reward_wants_a_final_answer():
    from fastrlhf.rewards import calculator_reward
    call = ct.tool_call_text("6 + 13") + " <tool_response> 19 </tool_response> assistant :"
    assert calculator_reward(["p"] * 4, [call + " #### 19", call, call + " #### 18", "#### 19"],
                             answer=["19"] * 4) == [1.0, 0.0, 0.0, 1.0]


def test_train_task_calculator_runs_sft_then_grpo_with_the_tool(tmp_path):
    from fastrlhf.cli import build_parser, build_step_configs
    args, extra = build_parser().parse_known_args(["train", "--task", "calculator", "--output_dir", str(tmp_path),
                                                   "--ppo.max_turns", "2"])
    cfgs = build_step_configs(args, extra)
    assert sorted(cfgs) == [1, 3]
    sft, grpo = cfgs[1], cfgs[3]
    assert sft.model_name_or_path == ct.calculator_model_dir()
    assert sft.data.paths == [ct.calculator_data_paths()["sft"]] and sft.data.split_ratios is None
    assert grpo.data.paths == [ct.calculator_data_paths()["rl"]] and grpo.model_name_or_path == str(tmp_path / "step1_sft")
    assert grpo.tools == [ct.TOOL_SPEC] and grpo.reward_fn == [ct.REWARD_SPEC] and grpo.reward_model is None
    assert grpo.algo == "grpo" and grpo.max_turns == 2
    grpo.validate()


def test_the_held_out_evaluation_answers_with_the_tool(tok, one_thread):
    from fastrlhf.tasks.evaluation import evaluate_tool_pass_at_k, heldout_items
    from fastrlhf.data import DataSpec
    items = heldout_items(tok, DataSpec(paths=[ct.calculator_data_paths()["rl"]]), limit=2)
    res = evaluate_tool_pass_at_k(ct.calculator_model_dir(), items, k=2, tools=[ct.TOOL_SPEC], max_new_tokens=4,
                                  max_turns=2, tokenizer=tok)   # random weights: the numbers are ~0, the run is real
    assert res["prompts"] == 2.0 and 0.0 <= res["pass@1"] <= res["pass@2"] <= 1.0 and 0.0 <= res["greedy"] <= 1.0
