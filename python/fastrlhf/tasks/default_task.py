"""The bundled default task: "describe a topic in a happy or a sad tone".

Every prompt asks for a description in one of two tones, e.g.
``Describe the old garden in a happy tone.`` A response is judged by an exact rule,
:func:`ground_truth_score`, so every run can report a ground-truth score beside the
learned reward:

    words  = the lowercase runs of letters a-z in the response
    score  = (#words from the requested tone's lexicon - #words from the opposite lexicon)
             / max(len(words), MIN_WORDS)

The score lies in [-1, 1]; an empty response scores 0. ``MIN_WORDS`` keeps a one-word
answer from scoring 1. The rule is word-level, so a tiny transformer learns it in minutes,
and the data's responses only reach about a third of the maximum, which leaves room for
PPO to raise it.

Every row of the shipped ``default/default_task.jsonl`` has ``prompt``, ``chosen`` and
``rejected``. Responses are built from clause templates whose adjective slots are drawn
from the happy, the sad or a neutral word list at a per-response quality level, so the
chosen answers (what SFT imitates) are a mix of good and mediocre ones. In every pair the
chosen answer beats the rejected one both in score (by at least ``MIN_SCORE_GAP``) and in
the net count of tone words (by at least ``MIN_NET_GAP``), so a reward model that only
counts words and one that learns the exact ratio agree on every pair.

``python -m fastrlhf.tasks.learnability`` checks that the tiny model learns the task (measured
runs: ``benchmarks/results/default_task_notes.md``).

The same folder holds a word-level tokenizer built from the data (``tokenizer.json``,
``tokenizer_config.json`` with bos/eos/pad/unk and a Human/Assistant chat template) and a
tiny Llama ``config.json``; no weights are shipped. Regenerate everything, byte for byte,
with ``python -m fastrlhf.tasks.default_task --out DIR [--seed N --rows N]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Dict

DEFAULT_SEED = 2026
DEFAULT_ROWS = 10000
DATA_FILE = "default_task.jsonl"
MIN_WORDS = 8
MAX_RESPONSE_TOKENS = 24     # words + punctuation, i.e. tokens of the word-level tokenizer
MIN_RESPONSE_WORDS = 6
MIN_SCORE_GAP = 0.1
MIN_NET_GAP = 2
# Share of prompts asking for the happy tone. With an exact 50/50 mix a word's value flips sign
# with the prompt, its average is zero, and a reward model trained from scratch sits at chance
# for its first few hundred steps (an XOR-like start); the 70/30 tilt gives it a first-order
# signal (word valence) to start from, after which it learns the flip for sad prompts.
HAPPY_FRACTION = 0.7

HAPPY = (
    "joyful bright cheerful delightful warm glad lovely sunny merry radiant playful hopeful "
    "sweet lively pleasant smiling golden wonderful vibrant blissful friendly festive charming "
    "sparkling laughing thrilled gleeful jolly bubbly beaming glowing sunlit").split()
SAD = (
    "gloomy grey lonely bleak tearful dull cold heavy weary somber dreary mournful empty "
    "broken lost faded bitter dark sorrowful hollow tired grim forgotten aching withered "
    "desolate miserable crying dim drab shadowed wilted").split()
NEUTRAL_ADJ = (
    "old large small wide tall long round green blue wooden open busy early late simple plain "
    "narrow deep flat new low high short thick thin square local northern southern ordinary "
    "stone brick main public central eastern western red white yellow brown black orange purple "
    "pink metal glass paper modern ancient crowded upper lower inner outer huge tiny "
    "middle usual common rural urban coastal seasonal daily weekly formal casual "
    "straight curved steep shallow dry wet loud soft smooth rough striped painted folded hidden quick slow "
    "sandy rocky grassy leafy snowy").split()
TOPICS = (
    "garden river city forest kitchen library market beach mountain village station school "
    "harbor bridge festival winter morning evening storm road park museum farm island desert "
    "lake castle street office cafe train concert meadow hospital bakery church valley field "
    "orchard lighthouse playground airport classroom zoo theater factory campsite wedding "
    "summer autumn spring holiday birthday picnic parade stadium gallery studio workshop barn "
    "harvest fair circus carnival garage cellar attic balcony porch rooftop subway tram bus ferry "
    "canal pier dock cliff cave glacier volcano jungle swamp prairie canyon waterfall pond "
    "fountain plaza courtyard hotel restaurant shop mall bookstore pharmacy bank "
    "laboratory greenhouse vineyard pasture stable").split()
NOUNS = (
    "air light sky sound path water music wind crowd door room corner roof floor grass gate "
    "tower yard table fence lamp sign bench window wall hill boat bird cloud song "
    "smell voice shadow stair chimney clock flag bell tree leaf sand snow "
    "roadside sidewalk doorway hallway ceiling carpet curtain shelf basket bottle cup plate "
    "bicycle car wagon kite candle poster statue mural rail pathway lantern bucket ladder rope wheel map "
    "ticket coat hat umbrella blanket pillow mirror piano guitar drum radio phone letter box tent").split()
PEOPLE = ("people children visitors neighbors workers friends families strangers travelers "
          "students teachers farmers sailors artists musicians dancers tourists shoppers "
          "passengers cooks guards painters builders runners drivers pilots doctors nurses bakers fishermen").split()
PREPS = "near in around by beside behind inside outside across along above below beyond past".split()
ADVERBS = "very so quite rather truly always often still almost fairly mostly somewhat".split()
VERBS = ("walk talk wait work sit stand read cook travel gather paint build sing dance play rest "
         "eat drink write draw run meet listen watch move climb swim jump ride drive fly sleep study").split()
TONES = ("happy", "sad")
LEXICON = {"happy": frozenset(HAPPY), "sad": frozenset(SAD)}
OPPOSITE = {"happy": "sad", "sad": "happy"}

PROMPT_TEMPLATES = (
    "Describe the {topic} in a {tone} tone.",
    "Write about the {topic} in a {tone} way.",
    "Tell me about the {topic} and keep it {tone}.",
    "Give a {tone} description of the {topic}.",
    "Describe the {topic} with a {tone} mood.",
    "Write a {tone} sentence about the {topic}.",
)
# Each "A" is an adjective slot, filled from the tone, opposite or neutral list.
CLAUSE_TEMPLATES = (
    "the {topic} is A",
    "the {topic} is {adv} A",
    "the {topic} is A and A",
    "the {noun} looks A",
    "the {noun} feels {adv} A",
    "{people} seem A {prep} the {topic}",
    "there is a A {noun} {prep} the {topic}",
    "it feels A",
    "the A {noun} stays A",
    "{people} {verb} {prep} the A {topic}",
    "{people} {verb} and {verb} {prep} the {noun}",
)
JOINERS = (" , and ", " , ", " . ", " but ", " while ")
# (P(tone word), P(opposite word)) per adjective slot; the rest are neutral adjectives.
QUALITY_LEVELS = ((0.85, 0.0), (0.55, 0.1), (0.3, 0.2), (0.15, 0.15), (0.05, 0.5), (0.0, 0.8))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Human: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# The settings tuned for this task, per trainer (sft, rm, ppo): the CLI puts them under the user's
# file and command line when no model is named. How the PPO profile was tuned:
# benchmarks/results/ppo_profile_notes.md. The task's model has a few million parameters, trained
# from scratch on 2 CPU cores. cpu_threads 1: its matrices are too small to split across cores, and extra threads spin-wait
# (10x the CPU time per step) whenever the cores are shared. PPO: answers are at most 24 tokens
# + EOS; kl_coef 0.2 keeps the policy a few nats from the SFT model (lower values let it exploit
# the reward model); the ground truth rises late, hence 300 steps.
PROFILES: Dict[str, Dict[str, Any]] = {
    "sft": {"cpu_threads": 1, "learning_rate": 3e-3, "micro_batch_size": 32, "num_epochs": 2, "warmup_ratio": 0.05,
            "weight_decay": 0.01, "eval_max_batches": 8, "log_steps": 10},
    "rm": {"cpu_threads": 1, "learning_rate": 1e-3, "micro_batch_size": 32, "num_epochs": 1, "warmup_ratio": 0.05,
           "weight_decay": 0.01, "eval_max_batches": 8, "log_steps": 10},
    # 300 steps of 32 prompts: about 2.5 passes over the 3,800 step-3 prompts (max_steps caps num_epochs)
    "ppo": {"rollout_batch_size": 32, "micro_batch_size": 16, "ppo_epochs": 2, "num_epochs": 3, "max_steps": 300,
            "learning_rate": 3e-4, "critic_learning_rate": 1e-3, "critic_warmup_steps": 4,
            "max_new_tokens": 28, "temperature": 1.0, "kl_coef": 0.2, "reward_clip": 5.0,
            "eval_prompts": 128, "weight_decay": 0.0, "save_steps": 50, "log_steps": 1, "cpu_threads": 1},
}

_WORD_RE = re.compile(r"[a-z]+")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")


def default_model_dir() -> str:
    """Folder with the default tokenizer and tiny Llama config (load both by this path)."""
    return str(Path(__file__).resolve().parent / "default")


def default_data_path() -> str:
    """The bundled dataset: JSON Lines with prompt / chosen / rejected."""
    return os.path.join(default_model_dir(), DATA_FILE)


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def prompt_tone(prompt: str) -> str:
    """The tone ('happy' or 'sad') a default-task prompt asks for; raw or chat-rendered prompt."""
    found = {w for w in _words(prompt) if w in TONES}
    if len(found) != 1:
        raise ValueError(
            f"not a default-task prompt (it must name exactly one tone of {TONES}): {prompt!r}")
    return found.pop()


def ground_truth_score(prompt: str, response: str) -> float:
    """Exact score of ``response`` for ``prompt`` under the task's rule (see module doc)."""
    tone = prompt_tone(prompt)
    words = _words(response)
    if not words:
        return 0.0
    wanted = sum(w in LEXICON[tone] for w in words)
    unwanted = sum(w in LEXICON[OPPOSITE[tone]] for w in words)
    return (wanted - unwanted) / max(len(words), MIN_WORDS)


def _net_tone_words(prompt: str, response: str) -> int:
    tone = prompt_tone(prompt)
    words = _words(response)
    return sum(w in LEXICON[tone] for w in words) - sum(w in LEXICON[OPPOSITE[tone]] for w in words)


def _make_prompt(rng: random.Random, happy_fraction: float) -> tuple[str, str, str]:
    tone = "happy" if rng.random() < happy_fraction else "sad"
    topic = rng.choice(TOPICS)
    shown = f"{rng.choice(NEUTRAL_ADJ)} {topic}" if rng.random() < 0.5 else topic
    return rng.choice(PROMPT_TEMPLATES).format(topic=shown, tone=tone), tone, topic


def _fill_clause(rng: random.Random, template: str, topic: str, tone: str, quality) -> str:
    p_tone, p_opposite = quality
    words = []
    slots = dict(topic=topic, adv=rng.choice(ADVERBS), noun=rng.choice(NOUNS), people=rng.choice(PEOPLE),
                 prep=rng.choice(PREPS))
    for word in re.sub(r"\{verb\}", lambda _: rng.choice(VERBS), template).format(**slots).split():
        if word == "A":
            u = rng.random()
            pool = (LEXICON[tone] if u < p_tone else
                    LEXICON[OPPOSITE[tone]] if u < p_tone + p_opposite else NEUTRAL_ADJ)
            word = rng.choice(sorted(pool))
        words.append(word)
    return " ".join(words)


def _make_response(rng: random.Random, topic: str, tone: str, quality) -> str:
    """A response of MIN_RESPONSE_WORDS..MAX_RESPONSE_TOKENS tokens, clauses joined naturally."""
    while True:
        clauses = [_fill_clause(rng, rng.choice(CLAUSE_TEMPLATES), topic, tone, quality)
                   for _ in range(rng.randint(1, 3))]
        text = clauses[0]
        for clause in clauses[1:]:
            text += rng.choice(JOINERS) + clause
        text = text + " ."
        text = re.sub(r"(^|\. )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
        text = text.replace(" ,", ",").replace(" .", ".")
        if (len(_TOKEN_RE.findall(text)) <= MAX_RESPONSE_TOKENS
                and len(_words(text)) >= MIN_RESPONSE_WORDS):
            return text


def generate_rows(seed: int = DEFAULT_SEED, rows: int = DEFAULT_ROWS,
                  happy_fraction: float = HAPPY_FRACTION) -> list[dict]:
    """Deterministic prompt/chosen/rejected rows; chosen wins by score and net tone words."""
    rng = random.Random(seed)
    out = []
    while len(out) < rows:
        prompt, tone, topic = _make_prompt(rng, happy_fraction)
        a = _make_response(rng, topic, tone, rng.choice(QUALITY_LEVELS))
        b = _make_response(rng, topic, tone, rng.choice(QUALITY_LEVELS))
        sa, sb = ground_truth_score(prompt, a), ground_truth_score(prompt, b)
        if sa < sb:
            a, b, sa, sb = b, a, sb, sa
        if sa - sb >= MIN_SCORE_GAP and _net_tone_words(prompt, a) - _net_tone_words(prompt, b) >= MIN_NET_GAP:
            out.append({"prompt": prompt, "chosen": a, "rejected": b})
    return out


def vocabulary() -> list[str]:
    """Every word and punctuation mark the task and its chat template use, lowercase, sorted."""
    words = set(HAPPY) | set(SAD) | set(NEUTRAL_ADJ) | set(TOPICS) | set(NOUNS) | set(PEOPLE)
    words |= set(PREPS) | set(ADVERBS) | set(TONES) | set(VERBS)
    for text in PROMPT_TEMPLATES + CLAUSE_TEMPLATES + JOINERS:
        words |= set(_TOKEN_RE.findall(re.sub(r"\{\w+\}", " ", text).lower()))
    words |= {"human", "assistant", "system", "user", ":", "!", "?", "'", "-"}
    return sorted(words)


def build_tokenizer():
    """Word-level fast tokenizer: lowercases, splits on words and punctuation, adds BOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    # Special tokens are matched before normalization, so "</s>" in a rendered chat stays one token.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256,
                                   chat_template=CHAT_TEMPLATE, padding_side="right",
                                   clean_up_tokenization_spaces=True, **SPECIAL_TOKENS)


def build_model_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """Tiny Llama (~0.9M params): 4 layers, GQA 4 query / 2 KV heads of dim 32, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=-(-vocab_size // 8) * 8, hidden_size=128, intermediate_size=352,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)


def save_tokenizer(tokenizer, out: Path, chat_template: str) -> None:
    """Save a bundled task's tokenizer so that its folder loads with transformers 4.x and 5.x."""
    tokenizer.save_pretrained(str(out))
    # transformers 4.x reads neither chat_template.jinja nor the v5 class name: keep both in the
    # config too, so the folder loads with either major version.
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=chat_template)
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    # transformers 5 saves the template as chat_template.jinja, 4.46 only into tokenizer_config.json
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")

def write_default_task(out_dir: str, seed: int = DEFAULT_SEED, rows: int = DEFAULT_ROWS) -> None:
    """Write data, tokenizer and model config into ``out_dir`` (deterministic for a seed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / DATA_FILE, "w", encoding="utf-8") as f:
        for row in generate_rows(seed, rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, out, CHAT_TEMPLATE)
    config = build_model_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                tokenizer.eos_token_id)
    config.save_pretrained(str(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the bundled default RLHF task.")
    parser.add_argument("--out", default=default_model_dir(), help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    args = parser.parse_args(argv)
    write_default_task(args.out, args.seed, args.rows)
    print(f"wrote the default task ({args.rows} rows, seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()
