"""Hyperparameter optimisation: search spaces, random/grid search, Hyperband and BOHB with
an ask/tell interface, and a Study that runs them with parallel workers and a crash-safe
journal.

This subpackage stands alone: it imports the standard library and numpy only and knows
objectives, not models (the trainer meets it through an adapter).
"""
from .space import Categorical, Float, Int, Ordinal, SearchSpace

__all__ = ["SearchSpace", "Float", "Int", "Categorical", "Ordinal"]
