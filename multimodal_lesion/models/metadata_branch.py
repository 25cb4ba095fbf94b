"""The metadata branch: an MLP embedding of the encoded patient features (age, sex, localization)."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError


class MetadataBranch(nn.Module):
    """Two-layer MLP over the ``MetadataEncoder`` output; the fusion heads read its ``output_dim``.

    Args:
        in_dim: width of the encoded patient features.
        hidden: width of the embedding (``ModelConfig.meta_hidden``).
        dropout: dropout between the two layers.
    """

    def __init__(self, in_dim: int, hidden: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        if in_dim < 1:
            raise ConfigError(f"the metadata branch needs meta_dim >= 1 encoded features, got {in_dim}")
        if hidden < 1:
            raise ConfigError(f"config key 'model.meta_hidden': must be >= 1, got {hidden}")
        self.in_dim = in_dim
        self.output_dim = hidden
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )

    def forward(self, meta: Tensor) -> Tensor:
        """(B, in_dim) encoded features -> (B, output_dim) embedding."""
        return self.net(meta)


__all__ = ["MetadataBranch"]
