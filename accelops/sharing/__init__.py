"""Cross-layer parameter sharing: share_parameters(model, pattern, scope, tie_embeddings)
with the alternate / sequential / sandwich patterns or explicit groups, and its report;
share_encoder_decoder(model): an encoder-decoder's decoder blocks reuse its encoder blocks' weights."""

from .share import (
    ENCODER_DECODER_PARTS,
    PATTERNS,
    SCOPES,
    SharingReport,
    retie,
    share_encoder_decoder,
    share_parameters,
    sharing_groups,
)

__all__ = [
    "share_parameters",
    "share_encoder_decoder",
    "sharing_groups",
    "retie",
    "SharingReport",
    "PATTERNS",
    "SCOPES",
    "ENCODER_DECODER_PARTS",
]
