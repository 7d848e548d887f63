"""A word-level tokenizer with a Human/Assistant chat template (tool turns included) and a tiny
random Llama on it, for rollouts whose observations and tool calls are real tokens; `guess`, a
fixture with that model saved as a dir and the first rows of the guess-the-number example's
prompts (the example's own file)."""
import os

import pytest
import torch

WORDS = ("human assistant : guess the number is higher lower correct too high low you won obs turn left count my "
         "between and say go word a b c d e f g h . ? , ! # = + - * / ( ) \" { } name arguments expression "
         "calculator").split()
WORDS += [str(i) for i in range(51)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}Human: {{ message['content'] }}\n\n"
            "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n"
            "{% elif message['role'] == 'tool' %}<tool_response> {{ message['content'] }} </tool_response>\n\n"
            "{% else %}{{ message['content'] }}\n\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")


def word_tokenizer(chat_template=TEMPLATE):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(SPECIALS + ADDED + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="\u2063", cleanup=False)
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIALS])
    tk.add_tokens([AddedToken(t, normalized=False) for t in ADDED])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=chat_template, padding_side="left",
                                   clean_up_tokenization_spaces=False)


def tiny_llama(tokenizer, seed=0, layers=2, hidden=48):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():   # a peaked output distribution: greedy choices far from ties
        model.lm_head.weight.mul_(8.0)
    return model


def prompt_item(tokenizer, text, **columns):
    """A step-3 prompt item as the data pipeline makes it."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=True)["input_ids"]
    return {"prompt": rendered, "prompt_input_ids": torch.tensor(ids), "columns": columns,
            "prompt_messages": [{"role": "user", "content": text}]}


EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "guess_number")


@pytest.fixture(scope="session")
def guess(tmp_path_factory):
    from fastrlhf.data import DataSpec, build_datasets
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("guess")
    tok = word_tokenizer()
    tiny_llama(tok, seed=4).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    rows = open(os.path.join(EXAMPLE, "prompts.jsonl")).readlines()[:24]
    (root / "guess.jsonl").write_text("".join(rows))
    spec = DataSpec(paths=[str(root / "guess.jsonl")], split_ratios="0,0,1", eval_fraction=0.2)
    train, evals = build_datasets(spec, tok, 3)
    return {"sft": str(root / "sft"), "spec": spec, "data": str(root / "guess.jsonl"),
            "train": [train[i] for i in range(len(train))], "eval": [evals[i] for i in range(len(evals))]}
