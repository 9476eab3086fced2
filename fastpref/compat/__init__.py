"""Drop-ins for code written against Liger-Kernel 0.8.5's chunked preference losses, on fastpref's kernels.

Same names, constructor arguments (names, order, defaults), call signatures, return structures and definitions
as Liger 0.8.5 (``liger_kernel.chunked_loss``): the modules ``LigerFusedLinear{DPO,CPO,SimPO,ORPO,KTO}Loss``, the
functions ``liger_fused_linear_{dpo,cpo,simpo,orpo,kto}`` and the
``LigerFusedLinear{DPO,CPO,SimPO,ORPO,KTO}Function`` classes whose ``.apply`` they are, and the same three for
GRPO (``LigerFusedLinearGRPOLoss``, ``liger_fused_linear_grpo``, ``LigerFusedLinearGRPOFunction``; see
``fastpref/compat/grpo.py``). Nothing of size tokens x vocabulary is formed, and liger-kernel need not be
installed. Each class docstring lists the few differences (a sequence with no scored token gives 0, not NaN; a
paired loss refuses an odd batch; DPO accepts ``loss_type="ipo"``). How the definitions map onto fastpref's fused
losses: ``fastpref/compat/_base.py``.

>>> from fastpref.compat import LigerFusedLinearDPOLoss
>>> loss, (chosen_logps, rejected_logps, *_aux) = LigerFusedLinearDPOLoss(beta=0.1)(
...     lm_head.weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_lm_head.weight)
"""

from .cpo import LigerFusedLinearCPOFunction, LigerFusedLinearCPOLoss, liger_fused_linear_cpo
from .dpo import LigerFusedLinearDPOFunction, LigerFusedLinearDPOLoss, liger_fused_linear_dpo
from .grpo import LigerFusedLinearGRPOFunction, LigerFusedLinearGRPOLoss, liger_fused_linear_grpo
from .kto import LigerFusedLinearKTOFunction, LigerFusedLinearKTOLoss, liger_fused_linear_kto
from .orpo import LigerFusedLinearORPOFunction, LigerFusedLinearORPOLoss, liger_fused_linear_orpo
from .simpo import LigerFusedLinearSimPOFunction, LigerFusedLinearSimPOLoss, liger_fused_linear_simpo

__all__ = [
    "LigerFusedLinearCPOFunction",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearDPOFunction",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearGRPOFunction",
    "LigerFusedLinearGRPOLoss",
    "LigerFusedLinearKTOFunction",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearORPOFunction",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOFunction",
    "LigerFusedLinearSimPOLoss",
    "liger_fused_linear_cpo",
    "liger_fused_linear_dpo",
    "liger_fused_linear_grpo",
    "liger_fused_linear_kto",
    "liger_fused_linear_orpo",
    "liger_fused_linear_simpo",
]
