"""Hyperparameter optimisation: search spaces, random/grid search, Hyperband and BOHB with
an ask/tell interface, and a Study that runs them with parallel workers and a crash-safe
journal.

This subpackage stands alone: it imports the standard library and numpy only and knows
objectives, not models (the trainer meets it through an adapter).
"""

from .bohb import BOHB
from .executors import ObjectiveLoadError
from .hyperband import Hyperband, hyperband_brackets
from .journal import JournalLockedError
from .optimizers import GridSearch, Optimizer, RandomSearch, Trial
from .space import Categorical, Float, Int, Ordinal, SearchSpace
from .study import Study, TrialResult

# Journal headers name the optimiser class; resume rebuilds it from this table.
_OPTIMIZERS = {c.__name__: c for c in (RandomSearch, GridSearch, Hyperband, BOHB)}

__all__ = [
    "SearchSpace",
    "Float",
    "Int",
    "Categorical",
    "Ordinal",
    "Trial",
    "Optimizer",
    "RandomSearch",
    "GridSearch",
    "Hyperband",
    "BOHB",
    "hyperband_brackets",
    "Study",
    "TrialResult",
    "ObjectiveLoadError",
    "JournalLockedError",
]
