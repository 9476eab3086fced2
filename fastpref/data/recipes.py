"""The seed papers' data recipes: RS-DPO pairs, counterfactual pairs, reward augmentation, Sr-DPO twins.

Every recipe takes a list of dicts, a ``datasets.Dataset`` or a JSONL path, returns the same container type
(a list for JSONL), and emits TRL preference records (``prompt``, ``chosen``, ``rejected`` and, where scores
exist, ``score_chosen`` / ``score_rejected``). Fields a recipe does not consume are carried over unchanged.
With ``return_stats=True`` it returns ``(records, RecipeStats)``: what was read, written and skipped, and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..utils.validation import POSITIVE, Interval, check_number
from .records import (
    InvalidRecordError,
    Prompt,
    RecipeStats,
    Record,
    Source,
    add_instruction,
    align_formats,
    check_list,
    check_score,
    check_text_or_messages,
    content_key,
    prepend_to_first_user_turn,
    require,
    run_recipe,
    split_prompt,
)

__all__ = [
    "COUNTERFACTUAL_VARIANTS",
    "REWARD_AUGMENT_TEMPLATE",
    "SR_DPO_PROMPT",
    "counterfactual_pairs",
    "format_score",
    "rejection_sampling_pairs",
    "reward_augment",
    "reward_augment_prompt",
    "sr_augment",
    "sr_prompt",
]

#: Zhang et al. 2024, "Reward-Augmented Data Enhances Direct Preference Alignment of LLMs": the goal
#: (system) prompt, as in the authors' ``scripts/reward_augmentation.py`` — one line up to the colon, then
#: ``"\nOverall score: {score}."``.
REWARD_AUGMENT_TEMPLATE = (
    "You are an assistant that generates responses for the instruction while implicitly achieving the following "
    "target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\nOverall score: {score}."
)

#: Yu et al. 2024, "Direct Alignment of Language Models via Quality-Aware Self-Refinement": the prompt ``p``.
SR_DPO_PROMPT = (
    "Please generate a response with a usefulness rating of 100 out of 100 for the following query. Note that the "
    "response should be harmless. The term 100 indicates the level of usefulness, where 100 is the maximum and 1 is "
    "the minimum. Query:"
)

#: Butcher 2024, "Aligning Large Language Models with Counterfactual DPO": variant -> (chosen, rejected) fields.
COUNTERFACTUAL_VARIANTS: dict[str, tuple[str, str]] = {
    "enc": ("treatment", "control"),
    "dis": ("control", "negative"),
    "contrastive": ("treatment", "negative"),
    "instruction_negation": ("control", "negative"),
}
_COUNTERFACTUAL_FIELDS = ("prompt", "control", "treatment", "negative", "negative_prompt")


# --------------------------------------------------------------------------------------------- RS-DPO


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# η in [0.5, 1): below 0.5 the reversed pair of a kept pair would pass too.
ETA_RANGE = Interval(0.5, 1.0, note="below 0.5 reversed pairs would pass")


def check_rs_dpo_thresholds(tau: object, eta: object) -> tuple[float, float]:
    """RS-DPO's temperature τ > 0 and threshold η ∈ [0.5, 1), as floats."""
    return check_number("tau", tau, POSITIVE), check_number("eta", eta, ETA_RANGE)  # type: ignore[return-value]


def rejection_sampling_pairs(
    samples: Source,
    tau: float = 1.0,
    eta: float = 0.85,
    *,
    deduplicate: bool = True,
    errors: str = "raise",
    return_stats: bool = False,
) -> Any:
    """RS-DPO pairs (Khaki et al. 2024, "RS-DPO: A Hybrid Rejection Sampling and Direct Preference
    Optimization Method for Alignment of Large Language Models").

    Input records: ``{"prompt": text | messages, "responses": [k], "rewards": [k], ...}`` — k responses
    sampled for the prompt and their reward-model scores. For every ordered pair ``(j, l)``, ``j != l``, the
    pair (winner ``y_j``, loser ``y_l``) is kept when

        σ((r_j − r_l) / τ) > η,

    giving ``{"prompt", "chosen": y_j, "rejected": y_l, "score_chosen": r_j, "score_rejected": r_l}``
    (scores as floats), pairs of one prompt in ``(j, l)`` index order. ``0.5 <= eta < 1`` so that at most one
    direction of a pair passes (a tie never does); ``tau > 0``.

    Args:
        samples: list of dicts, ``datasets.Dataset`` or JSONL path.
        tau: temperature of the reward gap, finite ``> 0``.
        eta: threshold on σ, ``0.5 <= eta < 1``.
        deduplicate: skip pairs whose chosen and rejected are the same response (only possible when equal texts
            got different rewards) and pairs repeating an earlier pair of the same prompt (duplicate samples);
            both are counted in the stats (``identical``, ``duplicate``). ``False`` keeps them.
        errors: ``"raise"`` on the first malformed record, or ``"skip"`` it and list it in the stats.
        return_stats: also return :class:`RecipeStats`; ``skipped["below_threshold"]`` counts unordered
            candidate pairs where neither direction passed, ``skipped["fewer_than_2_responses"]`` the records
            with 0 or 1 responses (no pair to form).
    """
    tau, eta = check_rs_dpo_thresholds(tau, eta)

    def per_record(rec: Mapping[str, Any], where: str, stats: RecipeStats) -> list[Record]:
        prompt = check_text_or_messages(require(rec, "prompt", where), "prompt", where)
        responses = check_list(require(rec, "responses", where), "responses", where)
        rewards = check_list(require(rec, "rewards", where), "rewards", where)
        if len(responses) != len(rewards):
            raise InvalidRecordError(
                where, f"length mismatch: {len(responses)} responses but {len(rewards)} rewards (expected one reward "
                "per response)")
        responses = [check_text_or_messages(y, f"responses[{i}]", where) for i, y in enumerate(responses)]
        rewards = [float(check_score(r, f"rewards[{i}]", where)) for i, r in enumerate(rewards)]
        extra = {key: value for key, value in rec.items() if key not in ("prompt", "responses", "rewards")}

        k = len(responses)
        if k < 2:  # a well-formed record that cannot give a pair: counted, not silently gone
            stats.skip("fewer_than_2_responses")
            return []
        out: list[Record] = []
        seen: set[str] = set()
        passed = 0
        for j in range(k):
            for l in range(k):  # noqa: E741 (the paper's index)
                if j == l or not _sigmoid((rewards[j] - rewards[l]) / tau) > eta:
                    continue
                passed += 1
                p, chosen, rejected = align_formats(prompt, responses[j], responses[l])
                if deduplicate:
                    if chosen == rejected:
                        stats.skip("identical")
                        continue
                    key = content_key([chosen, rejected])
                    if key in seen:
                        stats.skip("duplicate")
                        continue
                    seen.add(key)
                out.append({**extra, "prompt": p, "chosen": chosen, "rejected": rejected,
                            "score_chosen": rewards[j], "score_rejected": rewards[l]})
        stats.skip("below_threshold", k * (k - 1) // 2 - passed)
        return out

    return run_recipe("rs-dpo", samples, per_record, errors=errors, return_stats=return_stats)


# ----------------------------------------------------------------------------------- Counterfactual DPO


def _check_variants(variant: str | Sequence[str]) -> list[str]:
    names = [variant] if isinstance(variant, str) else list(variant)
    if not names:
        raise ValueError(f"variant must name at least one of {sorted(COUNTERFACTUAL_VARIANTS)}, got {variant!r}")
    out = []
    for name in names:
        key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
        if key not in COUNTERFACTUAL_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(COUNTERFACTUAL_VARIANTS)}, got {name!r}")
        out.append(key)
    return out


def counterfactual_pairs(
    records: Source,
    variant: str | Sequence[str] = "contrastive",
    *,
    errors: str = "raise",
    return_stats: bool = False,
) -> Any:
    """Counterfactual DPO pairs (Butcher 2024, "Aligning Large Language Models with Counterfactual DPO").

    Input records: ``{"prompt", "control", "treatment", "negative"[, "negative_prompt"]}`` — the responses
    generated under the plain prompt (control), a desired-style prompt (treatment) and an undesired-style
    prompt (negative); ``negative_prompt`` is that undesired-style prompt (see
    :func:`fastpref.data.counterfactual_generations`). Only the fields the variant reads are required.

    ===========================  ===================  =====================
    variant                      training prompt      chosen ≻ rejected
    ===========================  ===================  =====================
    ``enc``                      ``prompt``           treatment ≻ control
    ``dis``                      ``prompt``           control ≻ negative
    ``contrastive`` (default)    ``prompt``           treatment ≻ negative
    ``instruction_negation``     ``negative_prompt``  control ≻ negative
    ===========================  ===================  =====================

    ``variant`` may be a list: each record then gives one pair per variant, in that order. Pairs whose chosen
    and rejected are identical (the instruction changed nothing) are skipped and counted (``identical``).
    The consumed fields are dropped; other fields are carried over.
    """
    variants = _check_variants(variant)

    def per_record(rec: Mapping[str, Any], where: str, stats: RecipeStats) -> list[Record]:
        built = []
        for name in variants:
            chosen_field, rejected_field = COUNTERFACTUAL_VARIANTS[name]
            prompt_field = "negative_prompt" if name == "instruction_negation" else "prompt"
            prompt = check_text_or_messages(require(rec, prompt_field, where), prompt_field, where)
            chosen = check_text_or_messages(require(rec, chosen_field, where), chosen_field, where)
            rejected = check_text_or_messages(require(rec, rejected_field, where), rejected_field, where)
            built.append(align_formats(prompt, chosen, rejected))
        extra = {key: value for key, value in rec.items() if key not in _COUNTERFACTUAL_FIELDS}
        out: list[Record] = []
        for prompt, chosen, rejected in built:
            if chosen == rejected:
                stats.skip("identical")
                continue
            out.append({**extra, "prompt": prompt, "chosen": chosen, "rejected": rejected})
        return out

    return run_recipe("counterfactual", records, per_record, errors=errors, return_stats=return_stats)


# ------------------------------------------------------------------------------- Reward-augmented DPO


def format_score(score: float) -> str:
    """A score as the goal prompt prints it: integral values as integers (``8.0 -> "8"``), others as is."""
    value = float(score)
    return str(int(value)) if value.is_integer() else repr(value)


def _check_template(template: str) -> str:
    if not isinstance(template, str) or "{score}" not in template:
        raise ValueError(f"template must be a string containing the placeholder '{{score}}', got {template!r}")
    return template


def reward_augment_prompt(
    prompt: Prompt,
    score: float = 10,
    *,
    template: str = REWARD_AUGMENT_TEMPLATE,
    as_system_message: bool = True,
) -> Prompt:
    """The goal-conditioned prompt of reward-augmented DPO (Zhang et al. 2024).

    ``template`` with ``{score}`` replaced by :func:`format_score` ``(score)``, put in a system message (a text
    prompt becomes ``[system, user]`` chat messages; an existing system message gets the goal in front,
    separated by a blank line) or, with ``as_system_message=False``, before the first user turn / the text
    prompt followed by a blank line (``goal + "\\n\\n" + x``, the authors' "nosys" variant). At inference,
    condition on the scale's best score: ``score=10`` (the default) for the paper's 1–10 scale.
    """
    template = _check_template(template)
    check_number("score", score)
    goal = template.replace("{score}", format_score(score))
    return add_instruction(prompt, goal, as_system_message=as_system_message, separator="\n\n")


def reward_augment(
    pairs: Source,
    *,
    template: str = REWARD_AUGMENT_TEMPLATE,
    as_system_message: bool = True,
    drop_ties: bool = True,
    errors: str = "raise",
    return_stats: bool = False,
) -> Any:
    """Reward-augmented preference data (Zhang et al. 2024, "Reward-Augmented Data Enhances Direct Preference
    Alignment of LLMs").

    Input records: ``{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}`` (UltraFeedback-
    binarized's fields; a conversation-only record is split into prompt and responses as TRL does). Each pair
    ``(x, y_w, y_l, r_w, r_l)`` becomes two adjacent records:

    1. prompt ``goal(r_w) ⊕ x``: ``y_w ≻ y_l``, ``score_chosen = r_w``, ``score_rejected = r_l``;
    2. prompt ``goal(r_l) ⊕ x``: ``y_l ≻ y_w`` (swapped), ``score_chosen = r_l``, ``score_rejected = r_w``,

    the goal written by :func:`reward_augment_prompt`. Pairs with ``r_w == r_l`` exactly would give two
    contradictory records under the same goal: they are dropped (``drop_ties=True``, counted as ``ties``).
    Pairs with ``r_w < r_l`` are augmented as given.
    """
    template = _check_template(template)

    def per_record(rec: Mapping[str, Any], where: str, stats: RecipeStats) -> list[Record]:
        prompt, chosen, rejected = split_prompt(rec, where)
        r_w = check_score(require(rec, "score_chosen", where), "score_chosen", where)
        r_l = check_score(require(rec, "score_rejected", where), "score_rejected", where)
        if drop_ties and r_w == r_l:
            stats.skip("ties")
            return []
        extra = {key: value for key, value in rec.items()
                 if key not in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")}

        def record(score_w: float, y_w: Any, score_l: float, y_l: Any) -> Record:
            try:
                x = reward_augment_prompt(prompt, score_w, template=template, as_system_message=as_system_message)
            except InvalidRecordError as e:
                raise InvalidRecordError(where, e.reason) from None
            x, y_w, y_l = align_formats(x, y_w, y_l)  # a text prompt may have become chat messages
            return {**extra, "prompt": x, "chosen": y_w, "rejected": y_l, "score_chosen": score_w,
                    "score_rejected": score_l}

        return [record(r_w, chosen, r_l, rejected), record(r_l, rejected, r_w, chosen)]

    return run_recipe("reward-augment", pairs, per_record, errors=errors, return_stats=return_stats)


# --------------------------------------------------------------------------------------------- Sr-DPO


def sr_prompt(prompt: Prompt, p: str = SR_DPO_PROMPT) -> Prompt:
    """``p ⊕ x`` of Sr-DPO / Sr-IPO (Yu et al. 2024): ``p + " " + x`` for text; for chat messages, ``p + " "``
    put before the content of the first user turn."""
    if not isinstance(p, str) or not p:
        raise ValueError(f"prompt must be a non-empty string, got {p!r}")
    if isinstance(prompt, str):
        return p + " " + prompt
    return prepend_to_first_user_turn(prompt, p, " ")


def sr_augment(
    records: Source,
    prompt: str = SR_DPO_PROMPT,
    *,
    field: str | None = None,
    errors: str = "raise",
    return_stats: bool = False,
) -> Any:
    """Sr-DPO / Sr-IPO prompt augmentation (Yu et al. 2024, "Direct Alignment of Language Models via
    Quality-Aware Self-Refinement", Eq. 11–12): each record's ``p ⊕ x`` twin, one per record, same order.

    The twin has the same responses (and every other field) with the prompt replaced by :func:`sr_prompt`
    ``(x, p)``; the trainer scores the pair under it to get the refinement margin Δ. With ``field="..."`` the
    augmented prompt goes to that field instead and ``prompt`` keeps ``x``. Records with ``chosen`` /
    ``rejected`` are put in explicit-prompt form first (as TRL does); prompt-only records are accepted.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string (the Sr-DPO prompt p), got {prompt!r}")
    if field is not None and (not isinstance(field, str) or not field):
        raise ValueError(f"field must be None or a non-empty field name, got {field!r}")

    def per_record(rec: Mapping[str, Any], where: str, stats: RecipeStats) -> list[Record]:
        out = dict(rec)
        if "chosen" in rec or "rejected" in rec:
            x, out["chosen"], out["rejected"] = split_prompt(rec, where)
        else:
            x = check_text_or_messages(require(rec, "prompt", where), "prompt", where)
        try:
            twin = sr_prompt(x, prompt)
        except InvalidRecordError as e:
            raise InvalidRecordError(where, e.reason) from None
        out["prompt"] = x
        out[field or "prompt"] = twin
        return [out]

    return run_recipe("sr-augment", records, per_record, errors=errors, return_stats=return_stats)
