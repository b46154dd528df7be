"""Deep-Align's network: equivariant weight-space layers and the siamese matching model."""

from deepalign.nn.model import DeepAlign, DeepAlignConfig

__all__ = ["DeepAlign", "DeepAlignConfig"]
