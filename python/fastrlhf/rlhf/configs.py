"""Every trainer's config, side by side. Each derives from `fastrlhf.config.TrainConfig` (the
options all trainers share: model, data, precision, ZeRO, batch sizes, schedule, LoRA,
checkpoints, logging) and adds or re-defaults its own. The class defaults suit pretrained
models; the settings tuned for the bundled tasks are those tasks' `PROFILES` (`fastrlhf.tasks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

from ..config import TrainConfig
from ..errors import ConfigError, RewardSpecError
from ..options import Range, above, at_least, fraction, option
from ..utils.distributed import get_world_size
from .algorithms import ALGORITHMS, AdvantageSettings, Algorithm, algo_help, names
from .ds_engine import batch_geometry
from .rl_math import IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_AGGREGATIONS



@dataclass
class SFTConfig(TrainConfig):
    """Step 1: supervised fine-tuning of a causal LM on prompt -> answer."""
    output_dir: str = option("output/step1_sft", "where checkpoints, the final model and logs are written",
                             fingerprint=False)
    learning_rate: float = option(1e-5, "peak learning rate")
    warmup_ratio: float = option(0.03, "warmup as a fraction of the total optimizer steps")


@dataclass
class RMConfig(TrainConfig):
    """Step 2: reward model (causal-LM backbone + scalar head) trained on preference pairs."""
    output_dir: str = option("output/step2_rm", "where checkpoints, the final model and logs are written",
                             fingerprint=False)
    learning_rate: float = option(1e-5, "peak learning rate")
    warmup_ratio: float = option(0.03, "warmup as a fraction of the total optimizer steps")

    MODEL_KIND: ClassVar[str] = "any"  # a base or SFT causal LM, or a reward model to train further


@dataclass
class DPOConfig(TrainConfig):
    """DPO on the step-2 preference split; `model_name_or_path` is the SFT model (policy and,
    unless `ref_model` is set, the frozen reference)."""
    output_dir: str = option("output/step3_dpo", "where checkpoints, the final model and logs are written",
                             fingerprint=False)
    ref_model: Optional[str] = option(None, "frozen reference policy; unset = the initial policy")
    beta: float = option(0.1, "DPO temperature: how far the policy may move from the reference")
    label_smoothing: float = option(0.0, "conservative DPO: assumed share of flipped preference labels")
    learning_rate: float = option(1e-4, "peak learning rate")

    RANGES: ClassVar[Dict[str, Range]] = {**TrainConfig.RANGES, "beta": above(0),
                                          "label_smoothing": Range(0.0, 0.5, high_open=True)}

    def model_inputs(self) -> List[Tuple[str, Optional[str], str]]:
        return super().model_inputs() + [("--ref_model", self.ref_model, "policy")] * bool(self.ref_model)


@dataclass
class PPOConfig(TrainConfig):
    """Step 3: PPO, GRPO, RLOO or REINFORCE++. `model_name_or_path` is the actor (the SFT model);
    `learning_rate`, `zero_stage`, `offload`, `lora_*` are the actor's. Each step samples
    `rollout_batch_size` x `group_size` answers per process, then makes `ppo_epochs` passes over
    them in mini-batches of `micro_batch_size` answers; an optimizer step takes `global_batch_size`
    answers over all processes (unset = one mini-batch per process, no accumulation)."""
    output_dir: str = option("output/step3_ppo", "where checkpoints, the final models and logs are written",
                             fingerprint=False)
    reward_model: Optional[str] = option(None, "the step-2 reward model dir (optional when a --reward_fn or "
                                          "--reward_url is given)")
    reward_fn: List[str] = option(None, "reward function SPEC, repeatable: package.module:function or "
                                   "path/to/file.py:function, called as fn(prompts, completions, **columns) -> "
                                   "list[float | None] in a worker process; e.g. fastrlhf.rewards:math_answer_match",
                                   factory=list)
    reward_url: List[str] = option(None, "HTTP reward server, repeatable: POST {prompts, completions, ...columns} "
                                    "-> {rewards}", factory=list)
    reward_weights: Optional[List[float]] = option(None, "one weight per reward source, in the order reward model, "
                                                    "--reward_fn's, --reward_url's; each >= 0; unset = all 1")
    # how rewards are fetched, not what they are: left out of the run's fingerprint
    reward_timeout: float = option(60.0, "seconds a reward function or server may take per batch (request)",
                                   fingerprint=False)
    reward_retries: int = option(3, "retries of a failed reward-server request (exponential backoff from 0.5 s)",
                                 fingerprint=False)
    reward_concurrency: int = option(4, "reward-server requests in flight at once, per URL", fingerprint=False)
    reward_request_size: int = option(0, "completions per reward-server request (0 = the whole batch in one)",
                                      fingerprint=False)
    critic_model: Optional[str] = option(None, "critic init; unset = the reward model, or the actor when there is "
                                          "none (PPO only)")
    ref_model: Optional[str] = option(None, "frozen reference policy; unset = the actor's initial weights")
    algo: str = option("ppo", algo_help(), choices=tuple(ALGORITHMS))
    rollout_batch_size: int = option(16, "prompts per PPO step per process")
    group_size: int = option(1, f"answers sampled per prompt (>= 2 for {', '.join(names(lambda a: a.grouped))})")
    ppo_epochs: int = option(1, "passes over each rollout batch")
    micro_batch_size: int = option(8, "answers per update mini-batch per process (one forward/backward)")
    packing: Optional[bool] = option(None, "train without padding: the answers of a mini-batch (and every scoring "
                                     "forward) packed into rows with positions restarting per answer (same losses "
                                     "as padded; eval stays padded); unset = on when every model passes the packing "
                                     "probe, else padded with a note", fingerprint=False)
    share_prompts: Optional[bool] = option(None, "when step 3 packs (its default): the answers to one prompt in a "
                                            "packed row run their prompt through the model once (actor, reference, "
                                            "critic and reward-model forwards and the backward; each answer attends "
                                            "to it as to its own copy: same numbers); false = once per answer; "
                                            "unset = on whenever step 3 packs", fingerprint=False)
    eval_batch_size: Optional[int] = option(None, "held-out prompts per process per eval generation batch; "
                                             "unset = rollout_batch_size", fingerprint=False)
    learning_rate: float = option(1e-5, "actor peak learning rate")
    lr_scheduler: str = option("constant", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    critic_learning_rate: float = option(5e-5, "critic peak learning rate")
    critic_warmup_steps: int = option(0, "critic linear warmup (optimizer steps)")
    critic_zero_stage: int = option(0, "critic DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    critic_offload: str = option("none", "critic optimizer/param offload", choices=("none", "cpu"))
    frozen_zero_stage: int = option(0, "reference/reward models: 3 partitions them, else full copies",
                                     choices=(0, 3))
    max_new_tokens: Optional[int] = option(None, "answer length cap; unset = data.max_answer_len")
    temperature: float = option(1.0, "sampling temperature of rollouts (> 0)")
    top_p: float = option(1.0, "nucleus sampling of rollouts")
    top_k: int = option(0, "top-k sampling of rollouts (0 = off)")
    min_new_tokens: int = option(0, "suppress EOS for this many answer tokens (benchmarks force full length)")
    clip_eps: float = option(0.2, "policy ratio clip (PPO, Schulman et al. 2017)")
    clip_eps_low: Optional[float] = option(None, "clip-higher: the ratio's lower clip 1 - eps_low; unset = clip_eps "
                                            "(DAPO, Yu et al. 2025: 0.2)")
    clip_eps_high: Optional[float] = option(None, "clip-higher: the ratio's upper clip 1 + eps_high; unset = clip_eps "
                                             "(DAPO: 0.28)")
    dual_clip: Optional[float] = option(None, "dual-clip: cap a negative-advantage token's loss at -c A, c > 1 (Ye et "
                                         "al. 2020: 3); unset = off")
    importance_level: str = option("token", "importance ratio per token (PPO) or per answer, the length-normalised "
                                    "log-ratio (GSPO, Zheng et al. 2025, with clip 3e-4 / 4e-4 and "
                                    "seq_mean_token_mean)",
                                    choices=IMPORTANCE_LEVELS)
    loss_agg: str = option("token_mean", "policy loss over tokens: token_mean (DAPO), seq_mean_token_mean (GRPO "
                            "paper), seq_mean_token_sum, seq_mean_token_sum_norm (Dr.GRPO: token sum / max_new_tokens)",
                            choices=LOSS_AGGREGATIONS)
    group_std_norm: Optional[bool] = option(None, "grpo: divide group advantages by the group std; false = Dr.GRPO "
                                             "(Liu et al. 2025); unset = true")
    tis_cap: Optional[float] = option(None, "truncated importance sampling: weight each token's loss by min(pi_trainer"
                                       " / pi_rollout_engine, C) (Yao et al. 2025: C = 2); unset = off")
    old_logprobs: str = option("trainer", "the rollout policy's log-probs (the PPO ratio's denominator): 'trainer' (a "
                               "trainer forward, or the update's own when the policy does not move before it has "
                               "seen every answer) or 'engine' (the generation engine's, saving that forward; sound "
                               "while logprob_mismatch_* stays small)", choices=("trainer", "engine"))
    dynamic_sampling: bool = option(False, "DAPO dynamic sampling (Yu et al. 2025): drop groups whose rewards are all "
                                    "equal and sample more prompts until the step has rollout_batch_size groups")
    max_sampling_rounds: Optional[int] = option(None, "dynamic sampling: at most this many rollout batches per step, "
                                                "then train on what was kept; unset = 10 (veRL's DAPO recipe)")
    mask_truncated: bool = option(False, "answers cut at --max_new_tokens (no EOS) leave the loss (DAPO's overlong "
                                  "filtering)")
    overlong_buffer_len: Optional[int] = option(None, "DAPO soft overlong penalty: answers in the last L tokens of "
                                                "--max_new_tokens lose up to --overlong_penalty_factor reward, "
                                                "linearly (DAPO: 4096 of 20480); unset = off")
    overlong_penalty_factor: Optional[float] = option(None, "the soft overlong penalty at the length limit; unset = "
                                                      "1.0 (DAPO)")
    entropy_coef: float = option(0.0, "entropy bonus: subtract this x the policy's entropy from the actor loss")
    value_clip: float = option(0.2, "value clip around the rollout values (0 = off)")
    value_loss_coef: float = option(1.0, "critic loss weight")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    kl_coef: float = option(0.05, "KL penalty coefficient (initial value when adaptive)")
    kl_estimator: str = option("k1", "per-token KL estimator", choices=KL_ESTIMATORS)
    adaptive_kl: bool = option(False, "adapt kl_coef toward target_kl")
    target_kl: float = option(1.0, "adaptive controller's target (summed per-answer KL)")
    kl_horizon: int = option(10000, "adaptive controller's horizon (answers)")
    kl_in_reward: Optional[bool] = option(None, f"KL as a reward penalty ({'/'.join(names(lambda a: a.kl_in_reward))}) "
                                           f"or a loss term ({'/'.join(names(lambda a: not a.kl_in_reward))}); "
                                           "unset = the algorithm's usual choice")
    reward_clip: float = option(5.0, "clip rewards (all sources summed) to +-c (0 = off)")
    normalize_reward: bool = option(False, "normalise scores by running mean/std before clipping")
    whiten_advantages: Optional[bool] = option(None, "whiten advantages per batch; unset = on for "
                                                f"{', '.join(names(lambda a: a.whiten))}")
    ptx_coef: float = option(0.0, "PPO-ptx: weight of the SFT loss mixed into the actor update (0 = off)")
    ema_decay: float = option(0.0, "keep an EMA copy of the actor with this decay (0 = off)")
    generation_fallback: Optional[str] = option(None, "hybrid engine fallback ('hf' = plain HF generate)",
                                                 choices=(None, "hf"), fingerprint=False)
    inference_tp_size: int = option(1, "tensor-parallel generation: groups of this many consecutive processes "
                                     "generate together, each holding 1/N of the actor's weights and KV cache "
                                     "(training stays ZeRO data parallel over all processes)")
    eval_prompts: int = option(64, "held-out prompts scored before and after training", fingerprint=False)
    reward_tokenizer: str = option("check", "actor vs reward tokenizer: 'check' (must match) or "
                                    "'retokenize' (decode and re-encode for the reward model)",
                                    choices=("check", "retokenize"))
    # multi-turn rollouts (fastrlhf.agents; README "Multi-turn rollouts: environments and tools")
    env: Optional[str] = option(None, "multi-turn environment: path/to/file.py:Class or package.module:Class, one "
                                "instance per trajectory in a worker process, reset(prompt, **columns) -> first user "
                                "message or None, step(action) -> fastrlhf.agents.Step(observation, reward, done)")
    tools: List[str] = option(None, "tool functions (type hints + docstring), repeatable: file.py:function or "
                              "package.module:function (e.g. fastrlhf.agents:calculator); the model calls them with "
                              "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>, a turn without a call "
                              "ends the trajectory. Not with --env", factory=list)
    max_turns: int = option(4, "model turns per trajectory (--env/--tools); one still going then is cut (counted)")
    max_observation_tokens: int = option(256, "tokens of one environment or tool turn; longer text is cut to fit")
    max_trajectory_tokens: Optional[int] = option(None, "tokens of a trajectory after its prompt (model and environment "
                                                  "turns); unset = max_turns x max_new_tokens + (max_turns - 1) x "
                                                  "max_observation_tokens, within the model's positions")
    env_timeout: float = option(30.0, "seconds per environment call (reset, step) and per tool call", fingerprint=False)
    env_workers: int = option(1, "worker processes per training process hosting the environments or tools",
                              fingerprint=False)
    log_rollouts: int = option(0, "trajectories (answers) per step written to <output_dir>/rollouts.jsonl (0 = off)",
                               fingerprint=False)

    RANGES: ClassVar[Dict[str, Range]] = {
        **TrainConfig.RANGES, "rollout_batch_size": at_least(1), "group_size": at_least(1), "ppo_epochs": at_least(1),
        "critic_learning_rate": above(0), "critic_warmup_steps": at_least(0), "max_new_tokens": at_least(1),
        "temperature": above(0, "PPO rollouts are sampled, not greedy"), "top_p": fraction(False, low_open=True),
        "top_k": at_least(0, "0 = off"), "min_new_tokens": at_least(0), "clip_eps": above(0),
        "clip_eps_low": above(0), "clip_eps_high": above(0), "dual_clip": above(1, "it caps the loss at -c x A"),
        "tis_cap": at_least(1, "a cap below 1 shrinks every token's weight"), "entropy_coef": at_least(0, "a bonus"),
        "value_clip": at_least(0, "0 = off"), "value_loss_coef": at_least(0), "gamma": fraction(False),
        "lam": fraction(False), "kl_coef": at_least(0), "target_kl": above(0), "kl_horizon": at_least(1),
        "reward_clip": at_least(0, "0 = off"), "ptx_coef": at_least(0, "0 = off"),
        "ema_decay": fraction(hint="0 = off"), "eval_prompts": at_least(0), "inference_tp_size": at_least(1),
        "reward_weights": at_least(0, "a penalty is a source that returns negative rewards"),
        "reward_timeout": above(0), "reward_retries": at_least(0), "reward_concurrency": at_least(1),
        "reward_request_size": at_least(0, "0 = the whole batch in one request"),
        "max_sampling_rounds": at_least(1, "a step samples at least one batch"), "overlong_buffer_len": at_least(1),
        "overlong_penalty_factor": above(0), "max_turns": at_least(1), "max_observation_tokens": at_least(1),
        "max_trajectory_tokens": at_least(1), "env_timeout": above(0), "env_workers": at_least(1),
        "log_rollouts": at_least(0, "0 = off")}

    def model_inputs(self) -> List[Tuple[str, Optional[str], str]]:
        return super().model_inputs() + [
            (f"--{key}", getattr(self, key), kind) for key, kind in (("reward_model", "reward"), ("critic_model", "any"),
                                                                     ("ref_model", "policy"))
            if getattr(self, key)]  # no --reward_model: rewards come from functions or servers

    def tokenizer_inputs(self) -> List[Tuple[str, Optional[str]]]:
        return super().tokenizer_inputs() + ([("--reward_model", self.reward_model)] if self.reward_model else [])

    def validate(self) -> None:
        super().validate()
        self._validate_agents()
        self.validate_rewards()
        if self.algorithm.grouped and self.group_size < 2:
            raise ConfigError(f"{self.algo} compares answers to the same prompt: set --group_size >= 2")
        self._validate_policy_loss()
        self._validate_dapo()
        answer_cap = self.max_new_tokens or self.data.max_answer_len
        if self.min_new_tokens > answer_cap:
            raise ConfigError(f"min_new_tokens ({self.min_new_tokens}) exceeds the answer length cap ({answer_cap}: "
                              "--max_new_tokens, else --data.max_answer_len)")
        if self.share_prompts and self.packing is False:
            raise ConfigError("--share_prompts shares prompts inside packed rows, and --packing is false: drop one of "
                              "the two")
        n = self.answers_per_step
        if n % self.micro_batch_size:
            raise ConfigError(f"rollout_batch_size x group_size = {n} answers do not split into mini-batches "
                              f"of micro_batch_size={self.micro_batch_size}; make it a divisor of {n}")
        if self.critic_offload != "none" and self.critic_zero_stage == 0:
            raise ConfigError("critic_offload=cpu needs ZeRO: set --critic_zero_stage 1, 2 or 3")
        self.check_accumulation(get_world_size())  # the launcher's WORLD_SIZE (1 without one)
        self.check_inference_tp(get_world_size())
        if self.deepspeed_config and (self.critic_zero_stage, self.critic_offload) != (0, "none"):
            raise ConfigError("--deepspeed_config serves the actor and the critic alike; set ZeRO and offload in "
                              "that file and drop --critic_zero_stage / --critic_offload")

    def _validate_policy_loss(self) -> None:
        """What RANGES cannot say: the checks that involve two options (the ranges of each were
        checked by `validate_config` already)."""
        low, _ = self.clip_range()
        if low >= 1:
            raise ConfigError(f"the lower ratio clip 1 - {low} must stay above 0: set --clip_eps_low below 1")
        if self.group_std_norm is not None and not self.algorithm.takes_group_std_norm:
            takers = " or ".join(names(lambda a: a.takes_group_std_norm))
            raise ConfigError(f"group_std_norm applies to --algo {takers} only (the algo is {self.algo}); drop it")
        if self.ref_model and self.kl_coef == 0:
            raise ConfigError("ref_model is only read for the KL penalty and kl_coef is 0: drop --ref_model or set "
                              "--kl_coef > 0")

    def _validate_dapo(self) -> None:
        """Dynamic sampling, the overlong options and engine log-probs: what each needs, and where
        engine log-probs would be wrong rather than cheaper."""
        if self.dynamic_sampling and not self.algorithm.grouped:
            grouped = ", ".join(names(lambda a: a.grouped))
            raise ConfigError(f"--dynamic_sampling drops groups of answers to one prompt whose rewards are all equal; "
                              f"--algo {self.algo} does not group answers (use {grouped})")
        if self.max_sampling_rounds is not None and not self.dynamic_sampling:
            raise ConfigError("--max_sampling_rounds caps dynamic sampling: add --dynamic_sampling (or drop it)")
        if self.overlong_penalty_factor is not None and self.overlong_buffer_len is None:
            raise ConfigError("--overlong_penalty_factor scales the soft overlong penalty: set --overlong_buffer_len too")
        shaping = [f for f, on in (("--mask_truncated", self.mask_truncated),
                                   ("--overlong_buffer_len", self.overlong_buffer_len is not None)) if on]
        if shaping and self.max_new_tokens is None:
            raise ConfigError(f"{' and '.join(shaping)} act on answers near the length limit, and this run sets none: "
                              f"set --max_new_tokens (unset, the data's max_answer_len, {self.data.max_answer_len}, "
                              "caps answers)")
        if self.overlong_buffer_len is not None and self.overlong_buffer_len >= self.max_new_tokens:
            raise ConfigError(f"--overlong_buffer_len {self.overlong_buffer_len} must be below --max_new_tokens "
                              f"{self.max_new_tokens} (it is the last part of that budget)")
        if self.old_logprobs == "engine":
            if self.tis_cap is not None:
                raise ConfigError("--tis_cap weighs tokens by pi_trainer / pi_engine at rollout time, which needs the "
                                  "trainer's log-probs; with --old_logprobs engine the PPO ratio already is pi / "
                                  "pi_engine (that correction is built in): drop one of them")
            if self.importance_level == "sequence":
                raise ConfigError("--old_logprobs engine with --importance_level sequence: GSPO clips the sequence "
                                  "ratio at ~3e-4, the size of an engine/trainer numerical mismatch, so rounding alone "
                                  "would clip answers; use --old_logprobs trainer")

    def clip_range(self):
        """(eps_low, eps_high) of the policy ratio clip."""
        low = self.clip_eps if self.clip_eps_low is None else self.clip_eps_low
        return low, self.clip_eps if self.clip_eps_high is None else self.clip_eps_high

    @property
    def sharing_prompts(self) -> bool:
        """Packed step-3 forwards run each group's prompt once (`--share_prompts`, on with packing)."""
        return self.packing is not False and self.share_prompts is not False

    def validate_rewards(self) -> None:
        """At least one reward source; every --reward_fn has the form of a spec (its module is imported
        by `check_reward_functions`, in a worker); URLs are http(s); one weight per source, not all 0
        (the numbers are checked by RANGES)."""
        from ..rewards.http import check_url
        from ..rewards.spec import check_spec
        if not (self.reward_model or self.reward_fn or self.reward_url or self.env):
            raise ConfigError("step 3 needs a reward: pass --reward_model DIR (the step-2 model), --reward_fn SPEC "
                              "(e.g. fastrlhf.rewards:math_answer_match), --reward_url URL or an --env that rewards")
        try:
            for spec in self.reward_fn:
                check_spec(spec)
            for url in self.reward_url:
                check_url(url)
        except RewardSpecError as e:
            raise ConfigError(str(e)) from None
        n = int(bool(self.reward_model)) + len(self.reward_fn) + len(self.reward_url)
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ConfigError(f"--reward_weights has {len(self.reward_weights)} values for {n} reward sources (in "
                              "order: the reward model, each --reward_fn, each --reward_url); give one per source")
        if self.reward_weights is not None and not any(self.reward_weights):
            raise ConfigError(f"--reward_weights are all 0 ({' '.join(f'{w:g}' for w in self.reward_weights)}): the "
                              "reward would be 0 for every answer and nothing would be learned; give at least one "
                              "source a weight > 0")

    def check_inputs(self, produced: Sequence[str] = (), tokenizers: bool = False) -> None:
        super().check_inputs(produced, tokenizers)
        self.check_reward_functions()
        if self.agentic:  # the environment class / tools loaded and checked in their workers
            from ..agents.step3 import check_agent_specs
            check_agent_specs(self)

    @property
    def agentic(self) -> bool:
        """Multi-turn rollouts: an --env or --tools."""
        return bool(self.env or self.tools)

    def trajectory_budget(self, max_new_tokens: int) -> int:
        """Tokens of a trajectory after its prompt (see --max_trajectory_tokens)."""
        return self.max_trajectory_tokens or (self.max_turns * max_new_tokens
                                              + (self.max_turns - 1) * self.max_observation_tokens)

    def _validate_agents(self) -> None:
        """--env / --tools: the forms of their specs (imported in workers by check_inputs), one of
        them, and the engine settings multi-turn rollouts run on."""
        from ..rewards.spec import check_spec
        if not self.agentic:
            return
        if self.env and self.tools:
            raise ConfigError("--env and --tools together: the tool environment is the environment; call your tools "
                              "from your environment's step(), or drop --env to let the model call them")
        try:
            if self.env:
                check_spec(self.env, "--env", "class")
            for spec in self.tools:
                check_spec(spec, "--tools", "function")
        except RewardSpecError as e:
            raise ConfigError(str(e)) from None
        if self.generation_fallback is not None:
            raise ConfigError("--env/--tools run on the hybrid engine's continuation API; drop --generation_fallback")

    def check_reward_functions(self) -> None:
        """Every --reward_fn imported in a worker process, each within --reward_timeout (its module is
        user code: never imported into the trainer), before any model loads."""
        from ..rewards.worker import check_reward_functions
        if not self.reward_fn:
            return
        try:
            check_reward_functions(self.reward_fn, self.reward_timeout)
        except RewardSpecError as e:
            raise ConfigError(str(e)) from None

    @property
    def answers_per_step(self) -> int:
        """Answers each process samples per PPO step."""
        return self.rollout_batch_size * self.group_size

    def check_inference_tp(self, world_size: int) -> None:
        """Tensor-parallel generation groups must tile the processes (the head counts are checked
        from the actor's config in ppo_models.check_inference_tp, still before any model loads)."""
        n = self.inference_tp_size
        if world_size % n:
            valid = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ConfigError(f"--inference_tp_size {n} does not divide the {world_size} processes of this run "
                              f"(groups are {n} consecutive ranks); valid choices: {valid}")
        if n > 1 and self.generation_fallback is not None:
            raise ConfigError(f"--inference_tp_size {n} runs the hybrid engine's decoder; --generation_fallback hf "
                              "generates with plain HF on each process. Drop one of them")

    def check_accumulation(self, world_size: int) -> None:
        """An optimizer step must not straddle two rollout batches."""
        accumulation = batch_geometry(self.global_batch_size, self.micro_batch_size,
                                      world_size)["gradient_accumulation_steps"]
        per_step = self.micro_batch_size * accumulation
        if self.answers_per_step % per_step:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} means {accumulation} mini-batches of "
                f"{self.micro_batch_size} per optimizer step per process, {per_step} answers, which does not "
                f"divide the {self.answers_per_step} answers of a rollout batch; lower --global_batch_size or "
                "raise --rollout_batch_size")

    @property
    def algorithm(self) -> Algorithm:
        return ALGORITHMS[self.algo]

    def advantage_settings(self) -> AdvantageSettings:
        """The advantage math's view of this config: unset options take the algorithm's defaults."""
        kl_in_reward = self.algorithm.kl_in_reward if self.kl_in_reward is None else self.kl_in_reward
        whiten = self.algorithm.whiten if self.whiten_advantages is None else self.whiten_advantages
        return AdvantageSettings(algo=self.algo, kl_estimator=self.kl_estimator,
                                 reward_clip=self.reward_clip or None, gamma=self.gamma, lam=self.lam,
                                 whiten_advantages=whiten, group_size=self.group_size,
                                 kl_in_reward=kl_in_reward, group_std_norm=self.group_std_norm is not False)
