"""Preference-loss formulas on sequence log-probs (pure torch): the layer above the fused kernels.

One function per loss type — ``sigmoid`` (DPO / cDPO), ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``,
``robust``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``,
``sigmoid_norm``, ``sr_dpo``, ``sr_ipo``, ``simpo``, ``cpo``, ``orpo``, ``sft`` — each
``f(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *, beta=0.1,
...) -> (losses [P], chosen_rewards [P], rejected_rewards [P])`` on per-pair log-prob sums, as trl 1.16's
``DPOTrainer`` (and its CPO / ORPO trainers) compute them. ``kto`` (with ``kl_estimate``) is trl 1.16's
unpaired ``KTOTrainer`` family (``kto``, ``apo_zero_unpaired``), per sequence. ``LossConfig`` holds validated
hyper-parameters of a possibly weighted mix of types; ``pair_losses(config, ...)`` evaluates it per pair (the
callable the fused kernels run on each group of pairs).

>>> chosen, rejected = torch.tensor([-12.0]), torch.tensor([-15.0])
>>> losses, _, _ = fastpref.losses.sigmoid(chosen, rejected, torch.tensor([-13.0]), torch.tensor([-14.0]))
"""

from .config import LossConfig, PairTerms, pair_losses, pair_terms, refinement_margin
from .formulas import (
    LOSS_TYPES,
    NEEDS_LENGTHS,
    NEEDS_REFINEMENT,
    PAIR_SEPARABLE,
    REFERENCE_FREE,
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    cpo,
    discopop,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    orpo,
    orpo_log_odds,
    rewards,
    robust,
    sft,
    sigmoid,
    sigmoid_norm,
    simpo,
    sppo_hard,
    sr_dpo,
    sr_ipo,
)
from .unpaired import UNPAIRED_LOSS_TYPES, kl_estimate, kto

__all__ = [
    "LOSS_TYPES",
    "NEEDS_LENGTHS",
    "NEEDS_REFINEMENT",
    "PAIR_SEPARABLE",
    "REFERENCE_FREE",
    "UNPAIRED_LOSS_TYPES",
    "LossConfig",
    "PairTerms",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "cpo",
    "discopop",
    "exo_pair",
    "hinge",
    "ipo",
    "kl_estimate",
    "kto",
    "nca_pair",
    "orpo",
    "orpo_log_odds",
    "pair_losses",
    "pair_terms",
    "refinement_margin",
    "rewards",
    "robust",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "simpo",
    "sppo_hard",
    "sr_dpo",
    "sr_ipo",
]
