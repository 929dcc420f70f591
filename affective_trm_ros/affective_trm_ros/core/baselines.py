"""Baselines with the TRM's API: a memoryless per-frame MLP and a GRU of similar size.

Both see the same input as the TRM: raw features normalised by the model's own buffers, the
blocks of masked modalities replaced by learned absent vectors (zero-initialised, in the normalised
space), plus the mask bits themselves. Both output valence/arousal clamped to [-1, 1] with an
identity gradient (a linear head, no saturating ``tanh``) and a learned confidence like the TRM's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from affective_trm_ros.core.trm import (
    CERTAINTY_BIAS_INIT,
    DEFAULT_MODALITY_DIMS,
    FusionModel,
    learned_confidence,
    straight_through_clamp,
    validate_modality_dims,
)


@dataclass
class MLPConfig:
    """Memoryless per-frame MLP: ``num_layers`` hidden layers of ``hidden_size`` with GELU."""

    modality_dims: dict = field(default_factory=lambda: dict(DEFAULT_MODALITY_DIMS))
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.modality_dims = validate_modality_dims(self.modality_dims)
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError('MLPConfig: hidden_size and num_layers must be >= 1')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'MLPConfig.dropout must be in [0, 1), got {self.dropout}')


@dataclass
class GRUConfig:
    """GRU baseline: input projection to ``hidden_size``, then a ``num_layers`` GRU over frames."""

    modality_dims: dict = field(default_factory=lambda: dict(DEFAULT_MODALITY_DIMS))
    hidden_size: int = 192
    num_layers: int = 1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.modality_dims = validate_modality_dims(self.modality_dims)
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError('GRUConfig: hidden_size and num_layers must be >= 1')
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f'GRUConfig.dropout must be in [0, 1), got {self.dropout}')


class _BaselineInput(FusionModel):
    """Normalised features with learned absent blocks, concatenated with the mask bits."""

    def __init__(self, modality_dims: dict) -> None:
        super().__init__(modality_dims)
        self.absent_features = nn.Parameter(torch.zeros(self.input_dim))

    def _inputs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        xn = torch.where(self._feature_mask(mask), self.normalize(x, mask), self.absent_features)
        return torch.cat([xn, mask.to(xn.dtype)], dim=-1)

    #: The confidence output is trained (Gaussian NLL) rather than derived from the mask.
    learns_confidence = True

    def _make_heads(self, hidden: int) -> None:
        self.output_head = nn.Linear(hidden, 2)
        self.certainty_head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.certainty_head.weight.zero_()
            self.certainty_head.bias.fill_(CERTAINTY_BIAS_INIT)
        # Kept for checkpoint compatibility; the learned confidence does not use coverage weights.
        self.modality_weight_logits.requires_grad_(False)

    def _heads(self, features: torch.Tensor, mask: torch.Tensor):
        # A clamp with identity gradient, not tanh: a saturated tanh stalls the baseline's training.
        va = straight_through_clamp(self.output_head(features))
        return va, learned_confidence(self.certainty_head(features).squeeze(-1), mask)


class MemorylessMLP(_BaselineInput):
    """Per-frame MLP: no state, each frame is predicted from that frame alone."""

    kind = 'mlp'

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config.modality_dims)
        self.config = config
        layers, width = [], self.input_dim + self.num_modalities
        for _ in range(config.num_layers):
            layers += [nn.Linear(width, config.hidden_size), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.hidden_size
        self.body = nn.Sequential(*layers)
        self._make_heads(config.hidden_size)

    def initial_state(self, batch_size: int, device=None) -> tuple:
        return ()

    def _step(self, x, mask, state):
        va, confidence = self._heads(self.body(self._inputs(x, mask)), mask)
        return va, confidence, ()

    def forward_sequence(self, x, mask, state=None):
        """All frames at once (no recurrence); equal to repeated :meth:`step`."""
        self._check_sequence(x, mask)
        batch, steps = x.shape[:2]
        flat_x, flat_mask = x.reshape(batch * steps, -1), mask.reshape(batch * steps, -1)
        va, confidence = self._heads(self.body(self._inputs(flat_x, flat_mask)), flat_mask)
        return va.view(batch, steps, 2), confidence.view(batch, steps), ()


class GRUBaseline(_BaselineInput):
    """Projection + GELU, then a GRU carried across frames; state ``(h,)`` with h (B, layers, hidden)."""

    kind = 'gru'

    def __init__(self, config: GRUConfig) -> None:
        super().__init__(config.modality_dims)
        self.config = config
        self.input_proj = nn.Linear(self.input_dim + self.num_modalities, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(config.hidden_size, config.hidden_size, num_layers=config.num_layers,
                          batch_first=True)
        self._make_heads(config.hidden_size)

    def initial_state(self, batch_size: int, device=None) -> tuple:
        device = self.device if device is None else device
        return (torch.zeros(batch_size, self.config.num_layers, self.config.hidden_size, device=device),)

    def _run(self, x, mask, h: torch.Tensor):
        """x (B, T, D), mask (B, T, M), h (B, layers, H) -> GRU outputs (B, T, H), new h."""
        batch, steps = x.shape[:2]
        inputs = self._inputs(x.reshape(batch * steps, -1), mask.reshape(batch * steps, -1))
        inputs = self.dropout(F.gelu(self.input_proj(inputs))).view(batch, steps, -1)
        out, h_n = self.gru(inputs, h.transpose(0, 1).contiguous())
        return out, h_n.transpose(0, 1)

    def _step(self, x, mask, state):
        out, h = self._run(x.unsqueeze(1), mask.unsqueeze(1), state[0])
        va, confidence = self._heads(out[:, 0], mask)
        return va, confidence, (h,)

    def forward_sequence(self, x, mask, state: Optional[tuple] = None):
        """The whole window through the fused GRU kernel; equal to repeated :meth:`step`."""
        self._check_sequence(x, mask)
        batch, steps = x.shape[:2]
        if state is None:
            state = self.initial_state(batch, x.device)
        out, h = self._run(x, mask, state[0])
        va, confidence = self._heads(out, mask)
        return va, confidence, (h,)


MODEL_CONFIGS = {'mlp': MLPConfig, 'gru': GRUConfig}
MODEL_CLASSES = {'mlp': MemorylessMLP, 'gru': GRUBaseline}


def baseline_config_from_dict(kind: str, data: dict):
    """Rebuild a baseline config from ``dataclasses.asdict`` output, rejecting unknown fields."""
    config_cls = MODEL_CONFIGS[kind]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f'unknown {config_cls.__name__} fields {unknown}')
    return config_cls(**data)
