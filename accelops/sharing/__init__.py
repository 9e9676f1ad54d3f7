"""Cross-layer parameter sharing: share_parameters(model, pattern, scope, tie_embeddings)
with the alternate / sequential / sandwich patterns or explicit groups, and its report."""

from .share import PATTERNS, SCOPES, SharingReport, retie, share_parameters, sharing_groups

__all__ = ["share_parameters", "sharing_groups", "retie", "SharingReport", "PATTERNS", "SCOPES"]
