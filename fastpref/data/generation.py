"""The generation side of the recipes: sample k responses per prompt, score them, build counterfactuals.

``transformers`` is imported lazily; any causal LM with ``generate`` and any ``AutoModelForSequenceClassification``
reward model (or a plain callable) work. Prompts are text (tokenised as is, with the tokenizer's special
tokens) or chat messages (rendered with the tokenizer's chat template and the generation prompt).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..utils.validation import POSITIVE, Interval, check_int, check_number
from .recipes import check_rs_dpo_thresholds, rejection_sampling_pairs
from .records import (
    InvalidRecordError,
    Prompt,
    Record,
    Source,
    add_instruction,
    check_text_or_messages,
    is_dataset,
    iter_source,
)

__all__ = [
    "RewardFn",
    "counterfactual_generations",
    "rs_dpo_pipeline",
    "sample_responses",
    "score_responses",
]

#: A batched reward: ``reward_fn(prompts, responses) -> one float per (prompt, response)``.
RewardFn = Callable[[list[Prompt], list[str]], Sequence[float]]


def _load_prompts(prompts: Source | Sequence[Prompt]) -> list[tuple[str, Prompt, dict[str, Any]]]:
    """``(where, prompt, other fields)`` for prompts given bare (text / messages) or inside records."""
    out = []
    for where, item in iter_source(prompts):
        if isinstance(item, InvalidRecordError):
            raise item
        if isinstance(item, Mapping) and "prompt" in item:
            extra = {k: v for k, v in item.items() if k != "prompt"}
            out.append((where, check_text_or_messages(item["prompt"], "prompt", where), extra))
        else:
            out.append((where, check_text_or_messages(item, "prompt", where), {}))
    return out


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
    return int(pad)


def _render(tokenizer: Any, messages: list[dict[str, Any]], where: str, *, generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRecordError(where, "the prompt is chat messages but the tokenizer has no chat_template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_prompt(tokenizer: Any, prompt: Prompt, where: str) -> list[int]:
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    else:
        ids = _render(tokenizer, prompt, where, generation_prompt=True)
    if not ids:
        raise InvalidRecordError(where, "the prompt encodes to zero tokens (nothing to generate from)")
    return ids


def _pad(rows: list[list[int]], pad_id: int, *, left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled)


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Source | Sequence[Prompt],
    *,
    num_samples: int = 4,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> Any:
    """Sample ``num_samples`` responses per prompt from a causal LM (the RS-DPO generation step).

    Args:
        model: a ``transformers`` causal LM (``model.generate``), on the device it should run on.
        tokenizer: its tokenizer; the pad token (else EOS) pads the batch on the left.
        prompts: prompts (text or chat messages) or records with a ``prompt`` field (list, ``datasets.Dataset``
            or JSONL path); the records' other fields are carried over.
        num_samples: k, responses per prompt (``num_return_sequences``).
        batch_size: prompts per ``generate`` call (so ``batch_size * num_samples`` sequences).
        do_sample, temperature, top_p: sampling settings; greedy (``do_sample=False``) allows ``num_samples=1``
            only. Other ``generate`` arguments (``top_k``, ``repetition_penalty``, ...) pass through.
        seed: ``torch.manual_seed(seed)`` before sampling, for reproducible samples.
        progress: show a tqdm progress bar.

    Returns:
        ``[{"prompt", "responses": [k str], ...}]`` in prompt order (a ``datasets.Dataset`` for a Dataset input).
        Responses are the decoded new tokens, special tokens removed.
    """
    num_samples = check_int("num_samples", num_samples, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    if do_sample:
        check_number("temperature", temperature, POSITIVE)
        check_number("top_p", top_p, Interval(0.0, 1.0, low_closed=False, high_closed=True))
    elif num_samples != 1:
        raise ValueError(f"num_samples must be 1 with do_sample=False (greedy decoding gives one response), "
                         f"got {num_samples}")
    items = _load_prompts(prompts)
    pad_id = _pad_id(tokenizer)
    encoded = [_encode_prompt(tokenizer, prompt, where) for where, prompt, _ in items]
    device = _device(model)
    sampling = {"do_sample": do_sample}
    if do_sample:
        sampling.update(temperature=float(temperature), top_p=float(top_p))
    if seed is not None:
        torch.manual_seed(seed)

    responses: list[list[str]] = []
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with _progress(len(items), "sampling", progress) as bar, torch.inference_mode():
            for idx in _batches(len(items), batch_size):
                input_ids, attention_mask = _pad([encoded[i] for i in idx], pad_id, left=True, device=device)
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                     num_return_sequences=num_samples, pad_token_id=pad_id, **sampling,
                                     **generate_kwargs)
                texts = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
                responses.extend(texts[n * num_samples:(n + 1) * num_samples] for n in range(len(idx)))
                bar.update(len(idx))
    finally:
        model.train(was_training)
    records = [{**extra, "prompt": prompt, "responses": resp} for (_, prompt, extra), resp in zip(items, responses)]
    return _like(prompts, records)


def _like(source: Any, records: list[Record]) -> Any:
    if is_dataset(source):
        import datasets

        return datasets.Dataset.from_list(records)
    return records


def _rm_encode(tokenizer: Any, prompt: Prompt, response: Any, where: str) -> list[int]:
    if isinstance(prompt, str) and isinstance(response, str):
        # Tokenised apart and joined, as TRL joins prompt and completion ids: decoding the new tokens alone drops
        # the leading space of SentencePiece vocabularies, so ``prompt + response`` could fuse two words.
        return (list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
                + list(tokenizer(response, add_special_tokens=False)["input_ids"]))
    conversation = [dict(m) for m in (prompt if not isinstance(prompt, str) else [{"role": "user", "content": prompt}])]
    conversation += ([{"role": "assistant", "content": response}] if isinstance(response, str)
                     else [dict(m) for m in response])
    return _render(tokenizer, conversation, where, generation_prompt=False)


def score_responses(
    samples: Source,
    reward: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    reward_index: int | None = None,
    progress: bool = True,
) -> Any:
    """Score every response with a reward model or a callable; adds ``"rewards": [k floats]`` to each record.

    Args:
        samples: ``[{"prompt", "responses": [k], ...}]`` (list, ``datasets.Dataset`` or JSONL path), e.g. from
            :func:`sample_responses`.
        reward: a sequence-classification reward model (``AutoModelForSequenceClassification``: the logit of the
            last non-pad token), scored on the prompt's tokens (with special tokens) followed by the response's
            for text, and on the chat template of ``prompt + [assistant response]`` for messages; or a batched callable
            ``reward(prompts, responses) -> floats`` (:data:`RewardFn`).
        tokenizer: the reward model's tokenizer (required for a model). Batches are right-padded.
        batch_size: (prompt, response) pairs per forward / call.
        reward_index: which logit is the reward when the model has several labels (default: it must have one).
        progress: show a tqdm progress bar.

    Non-finite rewards raise, naming the record and the response.
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    is_model = isinstance(reward, torch.nn.Module)
    if not is_model and not callable(reward):
        raise TypeError(f"reward must be a reward model (torch.nn.Module) or a callable, got {type(reward).__name__}")
    if is_model and tokenizer is None:
        raise ValueError("tokenizer must be given with a reward model (got tokenizer=None)")

    records, flat = [], []
    for where, rec in iter_source(samples):
        if isinstance(rec, InvalidRecordError):
            raise rec
        if not isinstance(rec, Mapping) or "prompt" not in rec or "responses" not in rec:
            raise InvalidRecordError(where, "expected a record with fields 'prompt' and 'responses'")
        prompt = check_text_or_messages(rec["prompt"], "prompt", where)
        responses = [check_text_or_messages(y, f"responses[{i}]", where) for i, y in enumerate(rec["responses"])]
        records.append(dict(rec))
        flat.extend((len(records) - 1, i, where, prompt, y) for i, y in enumerate(responses))

    scores: list[float] = []
    with _progress(len(flat), "scoring", progress) as bar:
        if is_model:
            scores = _score_with_model(reward, tokenizer, flat, batch_size, reward_index, bar)
        else:
            for idx in _batches(len(flat), batch_size):
                got = list(reward([flat[i][3] for i in idx], [flat[i][4] for i in idx]))
                if len(got) != len(idx):
                    raise ValueError(f"reward callable returned {len(got)} scores for a batch of {len(idx)} responses")
                scores.extend(float(s) for s in got)
                bar.update(len(idx))

    for rec in records:
        rec["rewards"] = [0.0] * len(rec["responses"])
    for (r, i, where, _, _), s in zip(flat, scores):
        if not math.isfinite(s):
            raise InvalidRecordError(where, f"the reward of responses[{i}] is not finite ({s!r})")
        records[r]["rewards"][i] = s
    return _like(samples, records)


def _score_with_model(model: Any, tokenizer: Any, flat: list[tuple], batch_size: int, reward_index: int | None,
                      bar: Any) -> list[float]:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", 1)
    if reward_index is None:
        if num_labels != 1:
            raise ValueError(f"reward_index must be given for a reward model with num_labels={num_labels} "
                             "(expected one label, the reward)")
        reward_index = 0
    pad_id = _pad_id(tokenizer)
    device = _device(model)
    restore_pad = config is not None and getattr(config, "pad_token_id", None) is None
    if restore_pad:  # HF pools the last non-pad token and refuses batches without a pad id
        config.pad_token_id = pad_id
    was_training = getattr(model, "training", False)
    model.eval()
    scores: list[float] = []
    try:
        with torch.inference_mode():
            for idx in _batches(len(flat), batch_size):
                rows = [_rm_encode(tokenizer, flat[i][3], flat[i][4], flat[i][2]) for i in idx]
                input_ids, attention_mask = _pad(rows, pad_id, left=False, device=device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                scores.extend(logits[:, reward_index].float().cpu().tolist())
                bar.update(len(idx))
    finally:
        model.train(was_training)
        if restore_pad:
            config.pad_token_id = None
    return scores


def rs_dpo_pipeline(
    model: Any,
    tokenizer: Any,
    prompts: Source | Sequence[Prompt],
    reward: Any,
    *,
    reward_tokenizer: Any = None,
    num_samples: int = 4,
    tau: float = 1.0,
    eta: float = 0.85,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    progress: bool = True,
    return_stats: bool = False,
    **generate_kwargs: Any,
) -> Any:
    """RS-DPO end to end (Khaki et al. 2024): sample k responses per prompt, score them, keep the pairs with
    σ((r_j − r_l)/τ) > η. Returns the preference records of :func:`rejection_sampling_pairs`."""
    tau, _ = check_rs_dpo_thresholds(tau, eta)
    samples = sample_responses(model, tokenizer, prompts, num_samples=num_samples, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                               progress=progress, **generate_kwargs)
    scored = score_responses(samples, reward, tokenizer=reward_tokenizer, batch_size=batch_size * num_samples,
                             progress=progress)
    return rejection_sampling_pairs(scored, tau=tau, eta=eta, return_stats=return_stats)


def counterfactual_generations(
    model: Any,
    tokenizer: Any,
    prompts: Source | Sequence[Prompt],
    *,
    desired_instruction: str,
    undesired_instruction: str,
    as_system_message: bool = True,
    separator: str = "\n\n",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> Any:
    """The three generations of Counterfactual DPO (Butcher 2024) for every prompt.

    ``control`` under the plain prompt ``x``, ``treatment`` under ``desired_instruction`` + ``x``, ``negative``
    under ``undesired_instruction`` + ``x``; each instruction goes in a system message (a text prompt becomes
    chat messages) or, with ``as_system_message=False``, before ``x`` / its first user turn, joined by
    ``separator`` (see :func:`fastpref.data.records.add_instruction`). Greedy decoding by default, so that the
    instruction is the only thing that differs between the three responses.

    Returns ``[{"prompt": x, "control", "treatment", "negative", "negative_prompt", ...}]`` — the input of
    :func:`fastpref.data.counterfactual_pairs`; ``negative_prompt`` (the prompt keeping the unwanted
    instruction) is the training prompt of the ``instruction_negation`` variant.
    """
    for name, value in (("desired_instruction", desired_instruction), ("undesired_instruction", undesired_instruction)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    items = _load_prompts(prompts)
    plain = [prompt for _, prompt, _ in items]
    desired = [add_instruction(p, desired_instruction, as_system_message=as_system_message, separator=separator,
                               where=w) for (w, _, _), p in zip(items, plain)]
    undesired = [add_instruction(p, undesired_instruction, as_system_message=as_system_message, separator=separator,
                                 where=w) for (w, _, _), p in zip(items, plain)]
    kwargs = dict(num_samples=1, batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=do_sample,
                  temperature=temperature, top_p=top_p, progress=progress, **generate_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    generated = [[r["responses"][0] for r in sample_responses(model, tokenizer, ps, **kwargs)]
                 for ps in (plain, desired, undesired)]
    records = [
        {**extra, "prompt": x, "control": c, "treatment": t, "negative": n, "negative_prompt": neg_prompt}
        for (_, x, extra), c, t, n, neg_prompt in zip(items, *generated, undesired)
    ]
    return _like(prompts, records)
