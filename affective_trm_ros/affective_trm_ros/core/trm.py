"""The stateful Tiny Recursive Model (TRM) for streaming valence/arousal fusion, and its seed-compatible mode.

The recursion follows Jolicoeur-Martineau (2025), "Less is More: Recursive Reasoning with Tiny
Networks": an answer state ``y`` and a latent state ``z`` are refined by ONE small shared network,
``n`` latent updates ``z = net(z, y + x)`` then one answer update ``y = net(y, z)``, the whole
repeated ``T`` times per step, the first ``T - grad_cycles`` repetitions without gradients.

What this module adds for streaming affect:

* **Tokens that give attention work to do**: one token per modality (its feature block projected
  to the hidden size, or a learned *absent* token when the modality is masked) plus one readout
  token. ``y`` and ``z`` hold one vector per token, so the network mixes the modalities and the
  memory of each.
* **State that persists across frames**: ``(y, z)`` after a step is the starting point of the
  next step of the same stream, until :meth:`FusionModel.reset_state`. A learned per-channel
  *carry gate* (on by default) blends each frame's result with the previous state,
  ``s = s_prev + g * (s_new - s_prev)``, so holding a value through a gap is easy to learn and
  gradients have a short path through time.
* **Bounded output and a learned confidence**: valence/arousal = ``tanh`` of a linear head on the
  readout token of ``y``; confidence = ``sigmoid(head(y_readout))``, 0 when no modality is present.
  The confidence encodes a predicted error scale ``sigma`` (:func:`sigma_from_confidence`) and is
  trained with a Gaussian negative log-likelihood of the valence/arousal error
  (:mod:`affective_trm_ros.offline.learning.losses`), so a low confidence means a large expected
  error.

:class:`SeedTRM` reproduces the AffectiveTRM prototype (one token, state reset every frame, linear
shortcut head on the input, parameter-free input LayerNorm) and loads its published state dict.

Every model here shares the API of :class:`FusionModel`: ``initial_state``, ``step``,
``reset_state``, ``forward_sequence``, ``set_normalization``. States are tuples of tensors whose
first dimension is the batch (a ``NamedTuple`` for the TRMs, ``()`` for memoryless models), so
callers can split, stack, detach and move them without knowing the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from affective_trm_ros.core.modalities import FEATURE_ORDER

# Dimensions of the default encoders (dasheng_base, hsemotion_enet_b0, embeddinggemma) in FEATURE_ORDER.
DEFAULT_MODALITY_DIMS = {'audio': 768, 'video': 1280, 'text': 768}

# The TRM reference code and the prototype both use this epsilon in their parameter-free RMSNorm.
RMS_NORM_EPS = 1e-5
# torch.nn.LayerNorm's default epsilon, which the prototype's input normaliser used.
INPUT_LAYER_NORM_EPS = 1e-5
# Smallest std the normalisation divides by: only a guard against 0 (constant features are found
# by a relative test in training, see offline/learning/data.py, and get std 1).
MIN_FEATURE_STD = 1e-12
# Predicted error std (valence/arousal units) at which the confidence is 0.5:
# confidence = 1 / (1 + sigma / CONFIDENCE_SIGMA_REF), i.e. sigma = ref * exp(-logit).
CONFIDENCE_SIGMA_REF = 0.25
# Initial bias of the certainty head: confidence 0.5 (sigma = CONFIDENCE_SIGMA_REF) before training.
CERTAINTY_BIAS_INIT = 0.0
# SwiGLU widths are rounded up to a multiple of this (as in the TRM reference layers).
SWIGLU_MULTIPLE = 256

MIXERS = ('attention', 'mlp')
# How gradients reach the state carried in from the previous frame through the gradient-free
# recursions: 'identity' (Jacobian-free, as if those recursions were the identity) or 'none'.
STATE_GRADIENTS = ('identity', 'none')


def swiglu_width(hidden_size: int, expansion: float, multiple: int = SWIGLU_MULTIPLE) -> int:
    """Intermediate width of a SwiGLU: round(expansion * hidden * 2/3) rounded up to ``multiple``."""
    width = round(expansion * hidden_size * 2 / 3)
    return -(width // -multiple) * multiple


def rms_norm(x: torch.Tensor, eps: float = RMS_NORM_EPS) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dimension, computed in float32."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def learned_confidence(logit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Confidence (B,) from the certainty head's logit (B,): ``sigmoid(logit)``, 0 with no modality."""
    return torch.sigmoid(logit) * mask.any(-1).to(logit.dtype)


def sigma_from_confidence(confidence: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The predicted error std that a learned confidence encodes: ``ref * (1 / c - 1)``."""
    c = confidence.clamp(eps, 1.0 - eps)
    return CONFIDENCE_SIGMA_REF * (1.0 - c) / c


def validate_modality_dims(modality_dims: dict) -> dict:
    """Check that modality names are known, in FEATURE_ORDER, with positive integer dims; return a copy."""
    if not modality_dims:
        raise ValueError('modality_dims is empty; expected e.g. {"audio": 768, "video": 1280, "text": 768}')
    unknown = [name for name in modality_dims if name not in FEATURE_ORDER]
    if unknown:
        raise ValueError(f'unknown modalities {unknown}; known: {list(FEATURE_ORDER)}')
    ordered = [name for name in FEATURE_ORDER if name in modality_dims]
    if list(modality_dims) != ordered:
        raise ValueError(f'modality_dims must follow the feature order {ordered}, got {list(modality_dims)}')
    for name, dim in modality_dims.items():
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f'modality {name!r}: dimension must be a positive int, got {dim!r}')
    return dict(modality_dims)


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TRMConfig:
    """Configuration of the stateful TRM (``seed_compatible=False``) or of the seed-compatible mode.

    ``h_cycles`` is T (deep recursions per step), ``l_cycles`` is n (latent updates per deep
    recursion), ``grad_cycles`` how many of the last deep recursions keep gradients (the paper: 1).
    ``state_gradient`` says how the gradient reaches the carried-in state through the gradient-free
    recursions, ``carry_gate`` whether a learned gate blends the new state with the previous one.
    """

    modality_dims: dict = field(default_factory=lambda: dict(DEFAULT_MODALITY_DIMS))
    hidden_size: int = 128
    num_heads: int = 4
    num_layers: int = 2
    expansion: float = 2.0
    h_cycles: int = 3
    l_cycles: int = 2
    grad_cycles: int = 1
    mixer: str = 'attention'
    state_gradient: str = 'identity'
    carry_gate: Optional[bool] = None  # None: on for the stateful TRM, off in seed-compatible mode
    seed_compatible: bool = False
    rms_norm_eps: float = RMS_NORM_EPS
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        self.modality_dims = validate_modality_dims(self.modality_dims)
        for name in ('hidden_size', 'num_heads', 'num_layers', 'h_cycles', 'l_cycles', 'grad_cycles'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'TRMConfig.{name} must be an int >= 1, got {value!r}')
        if self.grad_cycles > self.h_cycles:
            raise ValueError(f'grad_cycles ({self.grad_cycles}) cannot exceed h_cycles ({self.h_cycles})')
        if self.hidden_size % self.num_heads:
            raise ValueError(f'hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}')
        if self.state_gradient not in STATE_GRADIENTS:
            raise ValueError(f'state_gradient must be one of {STATE_GRADIENTS}, got {self.state_gradient!r}')
        if self.mixer not in MIXERS:
            raise ValueError(f'mixer must be one of {MIXERS}, got {self.mixer!r}')
        if self.seed_compatible and self.mixer != 'attention':
            raise ValueError('the seed-compatible mode uses attention; mixer must be "attention"')
        if self.carry_gate is None:
            self.carry_gate = not self.seed_compatible
        if self.seed_compatible and self.carry_gate:
            raise ValueError('the seed-compatible mode resets its state every frame; '
                             'carry_gate must be False')
        if self.expansion <= 0:
            raise ValueError(f'expansion must be > 0, got {self.expansion}')

    @classmethod
    def seed(cls, modality_dims: Optional[dict] = None) -> TRMConfig:
        """The AffectiveTRM prototype's configuration (hidden 512, 8 heads, 2 layers, H 2, L 1)."""
        return cls(modality_dims=dict(modality_dims or DEFAULT_MODALITY_DIMS), hidden_size=512,
                   num_heads=8, num_layers=2, expansion=4.0, h_cycles=2, l_cycles=1, grad_cycles=2,
                   mixer='attention', carry_gate=False, seed_compatible=True)

    @property
    def input_dim(self) -> int:
        return sum(self.modality_dims.values())


class TRMState(NamedTuple):
    """Recurrent state of a TRM stream batch: answer ``y`` and latent ``z``, each (B, tokens, hidden)."""

    y: torch.Tensor
    z: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Shared base


def detach_state(state: tuple) -> tuple:
    """The same state without autograd history (for truncated back-propagation through time)."""
    return _map_state(state, lambda t: t.detach())


def clone_state(state: tuple) -> tuple:
    """A copy of a state that shares no storage with the original."""
    return _map_state(state, lambda t: t.clone())


def split_state(state: tuple, batch_size: int) -> list:
    """Split a batched state into ``batch_size`` states of batch 1 (views, no copy)."""
    return [_map_state(state, lambda t, i=i: t[i:i + 1]) for i in range(batch_size)]


def stack_states(states: list) -> tuple:
    """Concatenate states of the same model along the batch dimension."""
    if not states:
        raise ValueError('stack_states needs at least one state')
    first = states[0]
    tensors = [torch.cat([s[k] for s in states], dim=0) for k in range(len(first))]
    return type(first)(*tensors) if hasattr(first, '_fields') else tuple(tensors)


def _map_state(state: tuple, fn) -> tuple:
    mapped = [fn(t) for t in state]
    return type(state)(*mapped) if hasattr(state, '_fields') else tuple(mapped)


class FusionModel(nn.Module):
    """Base of every fusion model: raw-feature normalisation, masking, the shared sequence API.

    Subclasses set ``kind`` and implement ``initial_state`` and ``_step``. ``feature_mean`` and
    ``feature_std`` (shape (D,)) are buffers, so they travel with ``state_dict`` and checkpoints.
    """

    kind: str = ''
    #: True when the confidence output is trained (Gaussian NLL); False when derived from the mask.
    learns_confidence: bool = False

    def __init__(self, modality_dims: dict) -> None:
        super().__init__()
        self.modality_dims = validate_modality_dims(modality_dims)
        self.modalities = tuple(self.modality_dims)
        self.input_dim = sum(self.modality_dims.values())
        self.num_modalities = len(self.modalities)
        bounds, start = [], 0
        for dim in self.modality_dims.values():
            bounds.append((start, start + dim))
            start += dim
        self.block_bounds = tuple(bounds)
        # Modality index of every feature column: turns a (B, M) mask into a (B, D) one by indexing.
        block_index = torch.cat([torch.full((hi - lo,), m, dtype=torch.long)
                                 for m, (lo, hi) in enumerate(bounds)])
        self.register_buffer('block_index', block_index, persistent=False)
        self.register_buffer('feature_mean', torch.zeros(self.input_dim))
        self.register_buffer('feature_std', torch.ones(self.input_dim))
        # Learned logits of each modality's weight in the coverage part of the confidence.
        self.modality_weight_logits = nn.Parameter(torch.zeros(self.num_modalities))

    # -- normalisation and masking --------------------------------------------------------------

    def set_normalization(self, mean, std) -> None:
        """Set the per-feature mean and std applied to raw inputs (same in training and serving)."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.input_dim or std.numel() != self.input_dim:
            raise ValueError(f'normalisation has {mean.numel()} means and {std.numel()} stds; the model '
                             f'input has {self.input_dim} features ({self.modality_dims})')
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError('normalisation statistics contain NaN or infinite values')
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std.clamp_min(MIN_FEATURE_STD))

    def normalize(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std with the blocks of masked modalities set to 0 (their values never leak)."""
        # torch.where (not a product) so NaN/inf in a masked block cannot propagate.
        xn = (x - self.feature_mean) / self.feature_std
        return torch.where(self._feature_mask(mask), xn, torch.zeros((), dtype=xn.dtype, device=xn.device))

    def _feature_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, M) modality mask -> (B, D) feature mask."""
        return mask[:, self.block_index]

    def _coverage(self, mask: torch.Tensor) -> torch.Tensor:
        """Weighted fraction of modalities present, in [0, 1]; equal weights = plain present fraction."""
        weights = torch.softmax(self.modality_weight_logits, dim=0)
        return (mask.to(weights.dtype) * weights).sum(-1)

    def _check_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(f'expected x of shape (B, {self.input_dim}), got {tuple(x.shape)}')
        if mask.shape != (x.shape[0], self.num_modalities):
            raise ValueError(f'expected mask of shape ({x.shape[0]}, {self.num_modalities}) '
                             f'for modalities {list(self.modalities)}, got {tuple(mask.shape)}')
        if mask.dtype != torch.bool:
            raise ValueError(f'mask must be a bool tensor, got {mask.dtype}')

    def _check_sequence(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if x.dim() != 3 or mask.dim() != 3 or x.shape[:2] != mask.shape[:2]:
            raise ValueError(f'expected x (B, T, D) and mask (B, T, M), got {tuple(x.shape)} and '
                             f'{tuple(mask.shape)}')
        self._check_inputs(x.reshape(-1, x.shape[-1]), mask.reshape(-1, mask.shape[-1]))

    # -- sequence API ---------------------------------------------------------------------------

    def initial_state(self, batch_size: int, device=None) -> tuple:
        raise NotImplementedError

    def _step(self, x: torch.Tensor, mask: torch.Tensor, state: tuple):
        raise NotImplementedError

    def step(self, x: torch.Tensor, mask: torch.Tensor, state: tuple):
        """One frame of B streams: raw x (B, D), mask (B, M) -> (va (B, 2), confidence (B,), new state)."""
        self._check_inputs(x, mask)
        return self._step(x, mask, state)

    def reset_state(self, state: tuple, which: torch.Tensor) -> tuple:
        """Return ``state`` with the streams where ``which`` (B,) is True back at the initial state."""
        if len(state) == 0:
            return state
        batch_size = state[0].shape[0]
        which = torch.as_tensor(which, dtype=torch.bool, device=state[0].device).reshape(-1)
        if which.numel() != batch_size:
            raise ValueError(f'reset flags have {which.numel()} entries for a batch of {batch_size}')
        init = self.initial_state(batch_size, state[0].device)
        return _map_state_pair(state, init, lambda s, i: torch.where(
            which.view((-1,) + (1,) * (s.dim() - 1)), i.to(s.dtype), s))

    def forward_sequence(self, x: torch.Tensor, mask: torch.Tensor, state: Optional[tuple] = None):
        """Run ``step`` over (B, T, D) / (B, T, M); returns (va (B, T, 2), confidence (B, T), final state)."""
        self._check_sequence(x, mask)
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        outputs, confidences = [], []
        for t in range(x.shape[1]):
            va, confidence, state = self.step(x[:, t], mask[:, t], state)
            outputs.append(va)
            confidences.append(confidence)
        return torch.stack(outputs, 1), torch.stack(confidences, 1), state

    def forward(self, x: torch.Tensor, mask: torch.Tensor, state: Optional[tuple] = None):
        """Same as :meth:`forward_sequence` (so hooks and wrappers that call the module work)."""
        return self.forward_sequence(x, mask, state)

    def detach_state(self, state: tuple) -> tuple:
        return detach_state(state)

    @property
    def device(self) -> torch.device:
        return self.feature_mean.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _map_state_pair(state: tuple, other: tuple, fn) -> tuple:
    mapped = [fn(s, o) for s, o in zip(state, other)]
    return type(state)(*mapped) if hasattr(state, '_fields') else tuple(mapped)


# ----------------------------------------------------------------------------------------------
# Building blocks


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: down(silu(gate) * up), gate and up from one fused projection."""

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__()
        width = swiglu_width(dim, expansion)
        self.gate_up_proj = nn.Linear(dim, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rope_cos_sin(head_dim: int, positions: int, theta: float) -> tuple:
    """Rotary embedding tables (positions, head_dim) in the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused q|k|v projection and optional RoPE."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, h: torch.Tensor, cos_sin: Optional[tuple] = None) -> torch.Tensor:
        batch, tokens, _ = h.shape
        qkv = self.qkv_proj(h).view(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each (B, L, heads, head_dim)
        if cos_sin is not None:
            cos, sin = (t[:tokens].unsqueeze(-2).to(q.dtype) for t in cos_sin)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class TokenMixer(nn.Module):
    """MLP mixer across tokens (TRM's ``mlp_t``): a SwiGLU applied along the token axis."""

    def __init__(self, tokens: int, expansion: float) -> None:
        super().__init__()
        self.mlp = SwiGLU(tokens, expansion)

    def forward(self, h: torch.Tensor, cos_sin: Optional[tuple] = None) -> torch.Tensor:
        return self.mlp(h.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """Post-norm block as in TRM: h = rms(h + mix(h)); h = rms(h + swiglu(h))."""

    def __init__(self, hidden_size: int, num_heads: int, expansion: float, mixer: str, tokens: int,
                 eps: float) -> None:
        super().__init__()
        if mixer == 'attention':
            self.self_attn = SelfAttention(hidden_size, num_heads)
        else:
            self.token_mlp = TokenMixer(tokens, expansion)
        self.mlp = SwiGLU(hidden_size, expansion)
        self.eps = eps

    def forward(self, h: torch.Tensor, cos_sin: Optional[tuple] = None) -> torch.Tensor:
        mixer = self.self_attn if hasattr(self, 'self_attn') else self.token_mlp
        h = rms_norm(h + mixer(h, cos_sin), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class RecursiveNet(nn.Module):
    """The one shared network: net(h, injection) = blocks(h + injection)."""

    def __init__(self, config: TRMConfig, tokens: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(config.hidden_size, config.num_heads, config.expansion, config.mixer, tokens,
                  config.rms_norm_eps) for _ in range(config.num_layers))

    def forward(self, h: torch.Tensor, injection: torch.Tensor, cos_sin: Optional[tuple] = None):
        h = h + injection
        for layer in self.layers:
            h = layer(h, cos_sin)
        return h


def straight_through_clamp(x: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """Clamp to [-bound, bound] in the forward pass; identity gradient (so training never stalls)."""
    return x + (x.clamp(-bound, bound) - x).detach()


def _trunc_normal(shape, std: float) -> torch.Tensor:
    tensor = torch.empty(shape)
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)
    return tensor


# ----------------------------------------------------------------------------------------------
# The stateful TRM


class StatefulTRM(FusionModel):
    """Streaming TRM: modality tokens + a readout token, recursive refinement, state kept across frames."""

    kind = 'trm'

    def __init__(self, config: TRMConfig) -> None:
        if config.seed_compatible:
            raise ValueError('config.seed_compatible is set; build SeedTRM (or use build_model)')
        super().__init__(config.modality_dims)
        self.config = config
        hidden = config.hidden_size
        self.num_tokens = self.num_modalities + 1  # one per modality + the readout token
        self.readout_index = self.num_modalities
        # Per-modality projection of the normalised feature block to one token.
        self.input_proj = nn.ModuleList(nn.Linear(dim, hidden) for dim in self.modality_dims.values())
        # Token for a masked modality (learned; never the projection of zero-filled features).
        token_std = 1.0 / math.sqrt(hidden)
        self.absent_tokens = nn.Parameter(_trunc_normal((self.num_modalities, hidden), token_std))
        # Type embedding of every token position, and the readout token's input.
        self.token_embedding = nn.Parameter(_trunc_normal((self.num_tokens, hidden), token_std))
        self.net = RecursiveNet(config, self.num_tokens)
        # Initial answer and latent states (learned; rms ~1 like the post-norm outputs).
        self.y_init = nn.Parameter(_trunc_normal((self.num_tokens, hidden), 1.0))
        self.z_init = nn.Parameter(_trunc_normal((self.num_tokens, hidden), 1.0))
        self.output_head = nn.Linear(hidden, 2)
        self.certainty_head = nn.Linear(hidden, 1)
        if config.carry_gate:
            # Per-channel update gates between the previous frame's state and this frame's result.
            self.carry_gate_y = nn.Linear(2 * hidden, hidden)
            self.carry_gate_z = nn.Linear(2 * hidden, hidden)
        with torch.no_grad():
            self.certainty_head.weight.zero_()
            self.certainty_head.bias.fill_(CERTAINTY_BIAS_INIT)
        # Kept for checkpoint compatibility; the learned confidence does not use coverage weights.
        self.modality_weight_logits.requires_grad_(False)

    #: The confidence output is trained (Gaussian NLL) rather than derived from the mask.
    learns_confidence = True

    def initial_state(self, batch_size: int, device=None) -> TRMState:
        device = self.device if device is None else device
        shape = (batch_size, self.num_tokens, self.config.hidden_size)
        return TRMState(self.y_init.to(device).expand(shape).clone(),
                        self.z_init.to(device).expand(shape).clone())

    def embed_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw features and mask -> input tokens (B, M + 1, hidden)."""
        xn = self.normalize(x, mask)
        tokens = []
        for m, (lo, hi) in enumerate(self.block_bounds):
            projected = self.input_proj[m](xn[:, lo:hi])
            tokens.append(torch.where(mask[:, m:m + 1], projected, self.absent_tokens[m]))
        tokens.append(torch.zeros_like(tokens[0]))  # readout token: its type embedding only
        return torch.stack(tokens, 1) + self.token_embedding

    def _recurse(self, x_tokens: torch.Tensor, y: torch.Tensor, z: torch.Tensor):
        """T deep recursions of (n latent updates, one answer update)."""
        cfg = self.config
        no_grad_cycles = cfg.h_cycles - cfg.grad_cycles
        if no_grad_cycles > 0:
            y_in, z_in = y, z
            with torch.no_grad():
                for _ in range(no_grad_cycles):
                    y, z = self._cycle(x_tokens, y, z)
            if cfg.state_gradient == 'identity' and torch.is_grad_enabled():
                # Jacobian-free backward: the gradient reaches the carried state as if the
                # gradient-free recursions were the identity (their values are unchanged).
                y = y + (y_in - y_in.detach())
                z = z + (z_in - z_in.detach())
        for _ in range(cfg.grad_cycles):
            y, z = self._cycle(x_tokens, y, z)
        return y, z

    @staticmethod
    def _gate(gate: nn.Linear, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        update = torch.sigmoid(gate(torch.cat([old, new], dim=-1)))
        return old + update * (new - old)

    def _cycle(self, x_tokens, y, z):
        for _ in range(self.config.l_cycles):
            z = self.net(z, y + x_tokens)
        y = self.net(y, z)
        return y, z

    def _step(self, x: torch.Tensor, mask: torch.Tensor, state: TRMState):
        x_tokens = self.embed_inputs(x, mask)
        y, z = self._recurse(x_tokens, state.y, state.z)
        if self.config.carry_gate:
            y = self._gate(self.carry_gate_y, state.y, y)
            z = self._gate(self.carry_gate_z, state.z, z)
        readout = y[:, self.readout_index]
        va = torch.tanh(self.output_head(readout))
        return va, learned_confidence(self.certainty_head(readout).squeeze(-1), mask), TRMState(y, z)


# ----------------------------------------------------------------------------------------------
# Seed-compatible mode


class SeedLevel(nn.Module):
    """Container whose attribute path matches the prototype's ``L_level.layers.{i}`` keys."""

    def __init__(self, config: TRMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(config.hidden_size, config.num_heads, config.expansion, 'attention', 1, config.rms_norm_eps)
            for _ in range(config.num_layers))

    def forward(self, h, injection, cos_sin):
        h = h + injection
        for layer in self.layers:
            h = layer(h, cos_sin)
        return h


class SeedTRM(FusionModel):
    """The AffectiveTRM prototype, reproduced: same parameters, same forward, same state-dict names.

    Per frame: parameter-free LayerNorm over the whole concatenated input, one token
    ``input_proj(x)``, state reset to (``H_init``, ``L_init``) (the prototype's ``halt_max_steps=1``),
    ``H_cycles`` x (``L_cycles`` latent updates, one answer update) through the shared 2-block
    post-norm network with RoPE, then ``output_head(z_H) + shortcut_head(x)``. The prototype's
    output is unbounded; :meth:`step` clamps it to [-1, 1] (identity gradient), and
    :meth:`raw_output` returns it untouched. ``q_head`` (the halting head) is loaded but, as in the
    prototype at inference, never changes the output. Masked modalities use learned absent blocks
    (zero-initialised, i.e. the prototype's zero fill), inserted before the LayerNorm; confidence is
    the present fraction (the prototype has no confidence output).
    """

    kind = 'seed_trm'

    def __init__(self, config: TRMConfig) -> None:
        if not config.seed_compatible:
            raise ValueError('SeedTRM needs a seed-compatible config (TRMConfig.seed())')
        super().__init__(config.modality_dims)
        self.config = config
        hidden, dim = config.hidden_size, self.input_dim
        self.input_proj = nn.Linear(dim, hidden, bias=False)
        self.output_head = nn.Linear(hidden, 2, bias=False)
        self.shortcut_head = nn.Linear(dim, 2, bias=True)
        self.q_head = nn.Linear(hidden, 2, bias=True)
        self.L_level = SeedLevel(config)
        self.H_init = nn.Parameter(_trunc_normal((hidden,), 0.02))
        self.L_init = nn.Parameter(_trunc_normal((hidden,), 0.02))
        # Values for masked feature blocks in the normalised space (zeros = the prototype's zero fill).
        self.absent_features = nn.Parameter(torch.zeros(dim))
        cos, sin = rope_cos_sin(hidden // config.num_heads, 2, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        with torch.no_grad():  # the prototype's initialisation
            nn.init.xavier_uniform_(self.shortcut_head.weight)
            self.shortcut_head.bias.zero_()
            self.output_head.weight.zero_()
            self.q_head.weight.normal_(0, 0.02)
            self.q_head.bias.fill_(-3.0)
        with torch.no_grad():  # equal coverage weights and no learned confidence in the prototype
            self.modality_weight_logits.requires_grad_(False)

    def initial_state(self, batch_size: int, device=None) -> TRMState:
        device = self.device if device is None else device
        shape = (batch_size, 1, self.config.hidden_size)
        return TRMState(self.H_init.to(device).expand(shape).clone(),
                        self.L_init.to(device).expand(shape).clone())

    def prepare_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw features -> the prototype's network input: normalised, absent blocks filled, LayerNorm."""
        xn = self.normalize(x, mask)
        xn = torch.where(self._feature_mask(mask), xn, self.absent_features)
        return F.layer_norm(xn, (self.input_dim,), eps=INPUT_LAYER_NORM_EPS)

    def raw_output(self, x: torch.Tensor, mask: torch.Tensor):
        """The prototype's unbounded ``logits`` (B, 2) and the carry (z_H, z_L) after the step."""
        self._check_inputs(x, mask)
        inputs = self.prepare_inputs(x, mask)
        injected = self.input_proj(inputs).unsqueeze(1)
        state = self.initial_state(x.shape[0], x.device)  # halt_max_steps=1: reset every frame
        z_h, z_l = state.y, state.z
        cos_sin = (self.rope_cos, self.rope_sin)
        for _ in range(self.config.h_cycles):
            for _ in range(self.config.l_cycles):
                z_l = self.L_level(z_l, z_h + injected, cos_sin)
            z_h = self.L_level(z_h, z_l, cos_sin)
        logits = self.output_head(z_h.squeeze(1)) + self.shortcut_head(inputs)
        return logits, TRMState(z_h, z_l)

    def _step(self, x: torch.Tensor, mask: torch.Tensor, state: TRMState):
        logits, new_state = self.raw_output(x, mask)
        return straight_through_clamp(logits), self._coverage(mask), new_state


# ----------------------------------------------------------------------------------------------


def build_model(config: TRMConfig) -> FusionModel:
    """The TRM for a config: :class:`SeedTRM` when ``seed_compatible`` else :class:`StatefulTRM`."""
    return SeedTRM(config) if config.seed_compatible else StatefulTRM(config)


def config_from_dict(data: dict) -> TRMConfig:
    """Rebuild a TRMConfig from ``dataclasses.asdict`` output, rejecting unknown fields."""
    known = {f.name for f in dataclasses.fields(TRMConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f'unknown TRMConfig fields {unknown}')
    return TRMConfig(**data)
