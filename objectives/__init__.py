"""The registry of objectives: one explicit dict, no registration by import side effects.

To add an objective, write one module with a frozen dataclass that subclasses `objectives.base.Objective`
and add one line to OBJECTIVES (the README's "Adding an objective" walks through it).
"""

from models.config import Arch
from objectives.base import IGNORE_INDEX, Batch, Framing, Objective
from objectives.clm import CausalLM
from objectives.denoise import Denoising
from objectives.mixture import Mixture
from objectives.mlm import MaskedLM
from objectives.span import PrefixLM, SpanCorruption

DEFAULT_OBJECTIVE = "clm"  # what `pretrain run` trains when no --objective or recipe says otherwise

OBJECTIVES: dict[str, type[Objective]] = {
    "clm": CausalLM,
    "mlm": MaskedLM,
    "span": SpanCorruption,
    "prefix": PrefixLM,
    "denoise": Denoising,
    "mixture": Mixture,
}

__all__ = ["DEFAULT_OBJECTIVE", "IGNORE_INDEX", "OBJECTIVES", "Arch", "Batch", "Framing", "Objective"]
