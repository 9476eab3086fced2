"""Tiny offline models, tokenizers and preference data for the examples and the tests (nothing is downloaded).

``toy_tokenizer()`` is a word-level ``tokenizers`` tokenizer over a fixed vocabulary, with a chat template so
conversational records work; ``toy_llama()`` is a random ``LlamaForCausalLM`` built from a config;
``toy_preference_records()`` gives prompt / chosen / rejected records (plain text or chat messages) in which
the chosen answer follows a learnable rule (it repeats the prompt's last word), so a few DPO steps move the
reward accuracy.
"""

from __future__ import annotations

import random
from typing import Any

_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
_WORDS = (
    "the a an and or but if then so because cat dog bird fish horse cow sheep goat mouse lion tiger bear wolf fox "
    "red blue green yellow black white big small fast slow happy sad hot cold new old good bad left right up down "
    "run walk jump swim fly eat drink sleep sing read write see hear say tell ask give take make find keep "
    "one two three four five six seven eight nine ten house tree river road city field sky sun moon star rain "
    "snow wind stone water fire bread milk apple book door window table chair light night day morning evening "
    "is are was were has have do does can will not very more most some any every all no yes please thanks query "
    "response rating usefulness out of for following note that should be harmless term indicates level where "
    "maximum minimum generate with 100 1 . , ? !"
).split()

_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <eos> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def toy_tokenizer() -> Any:
    """A word-level fast tokenizer (about 180 tokens) built in-process, with ``<pad>``, ``<eos>`` and a chat
    template (``<|role|> content <eos>``). Unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL + [w for w in dict.fromkeys(_WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        additional_special_tokens=_SPECIAL[4:],
    )
    tok.chat_template = _CHAT_TEMPLATE
    tok.padding_side = "left"  # TRL's requirement for generation; the collators pad the right themselves
    return tok


def toy_llama(
    tokenizer: Any | None = None,
    *,
    hidden_size: int = 48,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    vocab_size: int | None = None,
    **config_overrides: Any,
) -> Any:
    """A random ``LlamaForCausalLM`` (fp32, ``sdpa`` attention) sized for the CPU. ``vocab_size`` (default: the
    tokenizer's) may exceed the tokenizer's vocabulary, to give the LM head a realistic width."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else toy_tokenizer()
    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attn_implementation="sdpa",
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = "fastpref-toy-llama"
    return model


def toy_preference_records(
    n: int,
    *,
    seed: int = 0,
    conversational: bool = False,
    min_words: int = 2,
    max_words: int = 7,
) -> list[dict[str, Any]]:
    """``n`` prompt / chosen / rejected records with varied lengths. Text records put a leading space on the
    completions (as TRL's datasets do); conversational ones are chat message lists."""
    rng = random.Random(seed)
    content = [w for w in _WORDS if w.isalpha()]
    records = []
    for _ in range(n):
        prompt = " ".join(rng.choices(content, k=rng.randint(min_words, max_words)))
        last = prompt.split()[-1]
        chosen = " ".join([last, *rng.choices(content, k=rng.randint(1, max_words))])
        rejected = " ".join(rng.choices(content, k=rng.randint(1, max_words)))
        if conversational:
            records.append({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            })
        else:
            records.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return records


__all__ = ["toy_llama", "toy_preference_records", "toy_tokenizer"]
