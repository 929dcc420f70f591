"""Dasheng audio encoder: published checkpoint format, strict loading, pooling, silence, batching."""

import logging

import numpy as np
import pytest
import torch
from dasheng.pretrained.pretrained import Dasheng

from affective_trm_ros.core.encoders import weights as registry
from affective_trm_ros.core.encoders.audio import MIN_SAMPLES, TOKENS_PER_SECOND
from affective_trm_ros.core.encoders.base import WeightsFormatError, WeightsNotFoundError, load_encoder

torch.set_num_threads(1)
# Base width (768) with one block instead of twelve keeps the test checkpoint small and fast.
TINY_CONFIG = {'embed_dim': 768, 'depth': 1, 'num_heads': 12}


def tiny_dasheng(seed: int = 0, **overrides) -> Dasheng:
    torch.manual_seed(seed)
    model = Dasheng(**{**TINY_CONFIG, **overrides}).eval()
    # Non-default input BatchNorm statistics, so the buffers must really be loaded.
    bn = model.init_bn[1]
    bn.running_mean.uniform_(-20.0, -10.0)
    bn.running_var.uniform_(50.0, 150.0)
    return model


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A Dasheng checkpoint in the published format: {"model": state dict, "config": kwargs}."""
    model = tiny_dasheng()
    path = tmp_path_factory.mktemp('dasheng') / 'dasheng_tiny.pt'
    torch.save({'model': model.state_dict(), 'config': dict(TINY_CONFIG)}, path)
    return path, model


@pytest.fixture(scope='module')
def encoder(checkpoint):
    return load_encoder('dasheng_base', device='cpu', weights=str(checkpoint[0]))


def tone(seconds: float = 1.0, freq: float = 220.0, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (amp * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def test_embedding_is_upstreams_model_output_mean_pooled(checkpoint, encoder):
    """The reference is the dasheng package's own loader and forward: Dasheng.from_pretrained(file),
    model(waveform) -> (1, tokens, 768), averaged over the tokens (time)."""
    path, _ = checkpoint
    upstream = Dasheng.from_pretrained(str(path)).eval()
    wave = tone()
    embedding, valid = encoder.encode(wave)
    with torch.no_grad():
        tokens = upstream(torch.from_numpy(wave)[None])
    assert tokens.shape[1] == TOKENS_PER_SECOND  # 1 s -> 25 tokens
    assert valid and embedding.shape == (768,) and embedding.dtype == np.float32
    np.testing.assert_allclose(embedding, tokens.mean(1)[0].numpy(), atol=1e-5)
    assert encoder.identity == 'dasheng_base@dasheng_tiny'


def test_batch_equals_single_calls_including_other_lengths(encoder):
    windows = [tone(freq=200), tone(freq=900, seed=1), np.zeros(16000, np.float32), tone(0.5, seed=2)]
    batch = encoder.encode_batch(windows)
    assert batch.valid.tolist() == [True, True, False, True]
    for index, window in enumerate(windows):
        single, valid = encoder.encode(window)
        assert valid == batch.valid[index]
        np.testing.assert_allclose(batch.embeddings[index], single, atol=1e-5, rtol=1e-4)
    assert not np.allclose(batch.embeddings[0], batch.embeddings[1])


def test_silence_threshold(checkpoint):
    quiet = np.full(16000, 5e-4, np.float32)  # RMS 5e-4, below the 1e-3 threshold
    strict = load_encoder('dasheng_base', device='cpu', weights=str(checkpoint[0]), silence_threshold=1e-3)
    off = load_encoder('dasheng_base', device='cpu', weights=str(checkpoint[0]), silence_threshold=0.0)
    assert strict.encode(quiet)[1] is False
    assert not strict.encode(quiet)[0].any()
    assert off.encode(quiet)[1] is True
    with pytest.raises(ValueError, match='silence_threshold'):
        load_encoder('dasheng_base', device='cpu', weights=str(checkpoint[0]), silence_threshold=-1)


@pytest.mark.parametrize('bad, match', [
    (np.zeros((2, 16000), np.float32), '1-D'),
    (np.zeros(16000, np.int16), 'float'),
    (np.zeros(MIN_SAMPLES - 1, np.float32), 'shorter than one Dasheng token'),
    (np.array([0.1, np.nan] * 8000, np.float32), 'NaN or Inf'),
])
def test_bad_windows_raise_value_error(encoder, bad, match):
    with pytest.raises(ValueError, match=match):
        encoder.encode(bad)


def test_strict_loading_refuses_missing_or_extra_tensors(tmp_path, checkpoint):
    _, model = checkpoint
    state = dict(model.state_dict())
    state.pop('norm.weight')
    state['extra.weight'] = torch.zeros(1)
    path = tmp_path / 'bad.pt'
    torch.save({'model': state, 'config': dict(TINY_CONFIG)}, path)
    with pytest.raises(WeightsFormatError, match=r'(?s)bad\.pt.*norm\.weight.*extra\.weight'):
        load_encoder('dasheng_base', device='cpu', weights=str(path))


def test_config_must_describe_the_stored_weights(tmp_path, checkpoint):
    _, model = checkpoint
    path = tmp_path / 'deeper.pt'
    torch.save({'model': model.state_dict(), 'config': {**TINY_CONFIG, 'depth': 2}}, path)
    with pytest.raises(WeightsFormatError, match='blocks.1'):
        load_encoder('dasheng_base', device='cpu', weights=str(path))


def test_not_the_published_format(tmp_path, checkpoint):
    path = tmp_path / 'state_only.pt'
    torch.save(checkpoint[1].state_dict(), path)
    with pytest.raises(WeightsFormatError, match='"model" and "config"'):
        load_encoder('dasheng_base', device='cpu', weights=str(path))


def test_other_width_is_not_dasheng_base(tmp_path):
    model = tiny_dasheng(embed_dim=64, num_heads=4)
    path = tmp_path / 'narrow.pt'
    torch.save({'model': model.state_dict(), 'config': {'embed_dim': 64, 'depth': 1, 'num_heads': 4}}, path)
    with pytest.raises(WeightsFormatError, match='64-d'):
        load_encoder('dasheng_base', device='cpu', weights=str(path))


@pytest.mark.parametrize('content, why', [(b'', r'empty \(0 bytes\)'),
                                          (b'garbage', r'Dasheng checkpoint: \w+')])
def test_unreadable_checkpoint_says_why(tmp_path, content, why):
    path = tmp_path / 'tiny.pt'
    path.write_bytes(content)
    with pytest.raises(WeightsFormatError, match=why):
        load_encoder('dasheng_base', device='cpu', weights=str(path))


def test_corrupted_cache_file_is_refused(tmp_path, monkeypatch, checkpoint):
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    cached = tmp_path / 'dasheng' / 'dasheng_base.pt'
    cached.parent.mkdir()
    cached.write_bytes(checkpoint[0].read_bytes())
    registry.record_checksum('dasheng_base', '0' * 64)
    with pytest.raises(registry.WeightsChecksumError, match='corrupted or replaced'):
        load_encoder('dasheng_base', device='cpu')
    registry.record_checksum('dasheng_base', registry.sha256_path(cached))
    assert load_encoder('dasheng_base', device='cpu').identity == 'dasheng_base@dasheng_base'


def test_non_finite_output_is_invalid_and_counted(tmp_path, checkpoint):
    _, model = checkpoint
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state['norm.weight'][0] = float('inf')
    path = tmp_path / 'inf.pt'
    torch.save({'model': state, 'config': dict(TINY_CONFIG)}, path)
    encoder = load_encoder('dasheng_base', device='cpu', weights=str(path))
    result = encoder.encode_batch([tone(), tone(freq=440)])
    assert result.valid.tolist() == [False, False] and result.nonfinite.all()
    assert not result.embeddings.any() and encoder.nonfinite_outputs == 2


def test_missing_weights_and_untrained_opt_in(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        load_encoder('dasheng_base', device='cpu')
    assert str(tmp_path / 'dasheng' / 'dasheng_base.pt') in str(err.value)
    assert 'affective-trm weights fetch dasheng_base' in str(err.value)
    with caplog.at_level(logging.WARNING):
        untrained = load_encoder('dasheng_base', device='cpu', allow_untrained=True)
    assert untrained.identity == 'dasheng_base@untrained'
    assert 'UNTRAINED' in caplog.text
    assert len(untrained.model.blocks) == 12  # the real base architecture, randomly initialised


# --- egemaps: openSMILE eGeMAPSv02 functionals -----------------------------------------------------

@pytest.fixture(scope='module')
def egemaps():
    pytest.importorskip('opensmile', reason='the opensmile package is not installed')
    return load_encoder('egemaps', device='cpu')


def speech(pitch: int = 50, amplitude: int = 100, seconds: float = 1.0) -> np.ndarray:
    """Real synthetic speech: espeak-ng saying a sentence (pitch 0-99, amplitude 0-200 on espeak's
    scales), ``seconds`` long from the first sound, 16 kHz float mono."""
    import io
    import shutil
    import subprocess
    import wave as wav

    from scipy.signal import resample_poly
    if shutil.which('espeak-ng') is None:
        pytest.skip('espeak-ng is not installed (apt-get install espeak-ng)')
    command = ['espeak-ng', '--stdout', '-s', '170', '-p', str(pitch), '-a', str(amplitude),
               'I really did not expect to see you here today']
    out = subprocess.run(command, capture_output=True, check=True).stdout
    with wav.open(io.BytesIO(out)) as reader:
        rate = reader.getframerate()
        samples = np.frombuffer(reader.readframes(reader.getnframes()), np.int16) / 32768.0
    samples = resample_poly(samples, 16000 // np.gcd(16000, rate), rate // np.gcd(16000, rate))
    start = int(np.argmax(np.abs(samples) > 0.01))   # skip the leading silence
    return samples[start:start + int(16000 * seconds)].astype(np.float32)


def test_egemaps_equals_opensmiles_own_functionals(egemaps):
    import opensmile
    reference = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                feature_level=opensmile.FeatureLevel.Functionals)
    wave = speech()
    embedding, valid = egemaps.encode(wave)
    expected = reference.process_signal(wave, 16000)
    assert valid and embedding.shape == (88,) and embedding.dtype == np.float32
    assert egemaps.feature_names == list(expected.columns)
    np.testing.assert_allclose(embedding, expected.to_numpy()[0], rtol=1e-5, atol=1e-6)
    assert egemaps.identity == 'egemaps@eGeMAPSv02' and egemaps.sample_rate == 16000


def test_egemaps_pitch_and_loudness_features_follow_the_voice(egemaps):
    names = egemaps.feature_names
    f0 = names.index('F0semitoneFrom27.5Hz_sma3nz_amean')
    loudness = names.index('loudness_sma3_amean')
    low, high, quiet, loud = egemaps.encode_batch([
        speech(pitch=20), speech(pitch=80), speech(amplitude=30), speech(amplitude=180)]).embeddings
    # espeak-ng pitch 20 -> 80 raises the voice by several semitones; amplitude x6 is ~15 dB louder.
    assert high[f0] > low[f0] + 3.0, (low[f0], high[f0])
    assert loud[loudness] > 2.0 * quiet[loudness], (quiet[loudness], loud[loudness])
    assert abs(loud[f0] - quiet[f0]) < 1.5        # loudness does not move the pitch features
    assert abs(high[loudness] - low[loudness]) < 0.5 * max(high[loudness], low[loudness])


def test_egemaps_batch_equals_single_calls_and_silence_is_invalid(egemaps):
    windows = [speech(), np.zeros(16000, np.float32), speech(seconds=0.5), speech(pitch=70)]
    batch = egemaps.encode_batch(windows)
    assert batch.valid.tolist() == [True, False, True, True]
    assert not batch.embeddings[1].any()
    for index, window in enumerate(windows):
        np.testing.assert_allclose(egemaps.encode(window)[0], batch.embeddings[index], rtol=1e-6)


def test_egemaps_shares_the_waveform_contract_with_dasheng(egemaps, encoder):
    from affective_trm_ros.core.encoders.base import encoder_class
    assert (egemaps.modality, egemaps.input_kind, egemaps.sample_rate) == (
        encoder.modality, encoder.input_kind, encoder.sample_rate)
    assert encoder_class('egemaps').dim == 88
    with pytest.raises(ValueError, match='1-D'):
        egemaps.encode(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match='NaN or Inf'):
        egemaps.encode(np.full(16000, np.nan, np.float32))
    with pytest.raises(ValueError, match='shorter than eGeMAPS'):
        egemaps.encode(speech()[:959])
    assert egemaps.encode(speech()[:960])[1]   # 60 ms: one pitch frame, finite features
