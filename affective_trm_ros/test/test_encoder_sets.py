"""Named encoder sets and the one function from node parameters to a loaded encoder."""

from pathlib import Path

import numpy as np
import pytest

from affective_trm_ros.core.encoders import loading
from affective_trm_ros.core.encoders.sets import (
    ENCODER_SETS,
    EncoderChoiceError,
    node_overrides,
    parse_encoder_choice,
    resolve_encoder_choice,
    set_name_of,
)

PLUGINS = Path(__file__).parent / 'fixtures' / 'encoder_node_plugins'


@pytest.fixture
def tiny_plugins(monkeypatch):
    """The test-only plugins tiny_video/tiny_audio/tiny_text, found through their entry points."""
    monkeypatch.syspath_prepend(str(PLUGINS))


def test_the_two_sets_name_the_documented_plugins():
    assert ENCODER_SETS['default'] == {'video': 'hsemotion_enet_b0', 'audio': 'dasheng_base',
                                       'text': 'embeddinggemma'}
    assert ENCODER_SETS['offline'] == {'video': 'fer_mini_xception', 'audio': 'egemaps', 'text': 'minilm'}


def test_choices_combine_a_set_and_per_modality_plugins():
    assert resolve_encoder_choice('offline') == {'audio': 'egemaps', 'video': 'fer_mini_xception',
                                                 'text': 'minilm'}
    assert resolve_encoder_choice('offline,text=embeddinggemma')['text'] == 'embeddinggemma'
    assert resolve_encoder_choice('video=tiny_video,audio=none') == {
        'audio': None, 'video': 'tiny_video', 'text': 'embeddinggemma'}   # the rest from the default set
    # --<modality>-encoder options win over the choice; 'none' leaves a modality out
    assert resolve_encoder_choice('offline', text='none', video=None) == {
        'audio': 'egemaps', 'video': 'fer_mini_xception', 'text': None}
    # without a set name, the base (the nodes' parameter files) is the starting point
    base = {'video': 'hsemotion_enet_b0', 'audio': 'dasheng_base', 'text': 'minilm'}
    assert resolve_encoder_choice(None, base=base)['text'] == 'minilm'
    assert resolve_encoder_choice('default', base=base)['text'] == 'embeddinggemma'
    assert parse_encoder_choice(' offline , audio = none ') == ('offline', {'audio': 'none'})


@pytest.mark.parametrize('choice, words', [
    ('online', ["unknown encoder set 'online'", 'default', 'offline']),
    ('smell=nose', ["unknown modality 'smell'"]),
    ('video=a,video=b', ['video is chosen twice']),
    ('text=', ['names no plugin', 'text=none']),
    ('video=none,audio=none,text=none', ['at least one encoder']),
    ('text=minilm,offline', ["unknown encoder set 'offline'"]),   # the set comes first
])
def test_bad_choices_say_what_is_wrong(choice, words):
    with pytest.raises(EncoderChoiceError) as raised:
        resolve_encoder_choice(choice)
    for word in words:
        assert word in str(raised.value)


def test_set_names_and_node_overrides():
    assert set_name_of(ENCODER_SETS['offline']) == 'offline'
    assert set_name_of({'video': 'fer_mini_xception', 'audio': None, 'text': 'minilm'}) == 'offline'
    assert set_name_of({'video': 'fer_mini_xception', 'text': 'embeddinggemma'}) is None
    assert node_overrides({'video': 'x', 'audio': None, 'text': 'y'}) == {
        'video_encoder': {'plugin': 'x'}, 'text_encoder': {'plugin': 'y'}}


def test_untrained_never_replaces_an_encoder_with_real_weights(monkeypatch):
    here = {'minilm', 'fer_mini_xception'}
    monkeypatch.setattr(loading, 'has_real_weights', lambda plugin, weights=None: plugin in here)
    chosen, notes = loading.prefer_trained(dict(ENCODER_SETS['default']))
    assert chosen == {'video': 'fer_mini_xception', 'audio': 'dasheng_base', 'text': 'minilm'}
    assert len(notes) == 2 and "'embeddinggemma' has no weights here" in notes[1]
    assert '--text-encoder embeddinggemma' in notes[1]   # how to keep it anyway
    # a plugin the user named stays, untrained if it must
    chosen, notes = loading.prefer_trained(dict(ENCODER_SETS['default']), keep={'text'})
    assert chosen['text'] == 'embeddinggemma' and len(notes) == 1


def test_real_weights_are_looked_up_where_the_encoder_loads_them(tmp_path, monkeypatch):
    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path))   # an empty cache
    assert not loading.has_real_weights('hsemotion_enet_b0')
    assert not loading.has_real_weights('no_such_plugin')
    weights = tmp_path / 'mine.pt'
    weights.write_bytes(b'x')
    assert loading.has_real_weights('hsemotion_enet_b0', weights=str(weights))


def test_encoder_from_parameters_offers_node_settings_the_plugin_takes(tiny_plugins):
    logged = []
    encoder = loading.encoder_from_parameters(
        'video', {'plugin': 'tiny_video', 'device': 'cpu', 'detector': 'haar', 'face_margin': 0.2,
                  'encoder_options': '{"delay_s": 0.0}'}, log=logged.append)
    assert encoder.plugin_id == 'tiny_video' and encoder.identity == 'tiny_video@none'
    assert logged == ["plugin 'tiny_video' takes no option(s) detector, face_margin; those parameters "
                      'do not apply to it']
    with pytest.raises(ValueError, match="plugin 'tiny_audio' encodes audio, not video"):
        loading.encoder_from_parameters('video', {'plugin': 'tiny_audio'})
    with pytest.raises(ValueError, match='encoder_options is not valid JSON'):
        loading.encoder_from_parameters('text', {'plugin': 'tiny_text', 'encoder_options': '{oops'})
    with pytest.raises(KeyError, match="unknown encoder plugin 'nope'"):
        loading.encoder_from_parameters('text', {'plugin': 'nope'})


def test_the_audio_silence_level_reaches_plugins_in_their_own_terms():
    offered = loading.offered_options('audio', {'silence_threshold_dbfs': -20.0, 'window_s': 1.0})
    assert offered == {'silence_threshold': pytest.approx(0.1)}
    assert loading.offered_options('text', {'max_chars': 5}) == {}
    video = loading.offered_options('video', {'detector': 'haar', 'min_face_size': 30, 'max_rate': 5.0})
    assert video == {'detector': 'haar', 'min_face_size': 30}


def test_video_stream_ids_follow_the_node():
    assert loading.video_stream_id({'max_faces': 1, 'stream_id': 'alice'}, 3) == 'alice'
    assert loading.video_stream_id({}, 0) == 'default'
    assert loading.video_stream_id({'max_faces': 4}, 2) == 'face_2'
    assert loading.video_stream_id({'max_faces': 4, 'track_id_prefix': 'p'}, 7) == 'p7'


def test_the_face_path_is_the_nodes(tiny_plugins):
    from affective_trm_ros.core.face_pipeline import FullFrameFaces, TrackedFaces

    encoder = loading.encoder_from_parameters('video', {'plugin': 'tiny_video', 'device': 'cpu'})
    assert isinstance(loading.video_faces_from_parameters(encoder, {'face_pipeline': 'full_frame'}),
                      FullFrameFaces)
    tracked = loading.video_faces_from_parameters(encoder, {'face_pipeline': 'tracked', 'detector': 'haar'})
    assert isinstance(tracked, TrackedFaces)
    frame = tracked.process(np.zeros((48, 64, 3), np.uint8), 0.0)
    assert frame.faces == []    # nothing that looks like a face
    with pytest.raises(ValueError, match="face_pipeline must be 'tracked' or 'full_frame'"):
        loading.video_faces_from_parameters(encoder, {'face_pipeline': 'sideways'})


def test_missing_weights_advice_names_the_command_line_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path))
    advice = loading.missing_weights_advice('video', 'hsemotion_enet_b0', weights_flag='--video-weights')
    assert advice.startswith('video encoder hsemotion_enet_b0: weights enet_b0_8_best_afew not found at '
                             f'{tmp_path}')
    assert 'affective-trm weights fetch enet_b0_8_best_afew' in advice and '--video-weights PATH' in advice
    other = loading.alternatives_advice()
    assert '--encoders offline' in other and '--allow-untrained' in other
    assert 'allow_untrained=True' not in advice + other


def test_a_running_system_takes_an_encoder_choice(capsys):
    from affective_trm_ros.cli import main
    from affective_trm_ros.core.encoders.sets import chosen_plugin
    from affective_trm_ros.system import SYSTEM_ARGUMENTS, plan

    assert chosen_plugin('offline', 'audio') == 'egemaps'
    assert chosen_plugin('offline,text=embeddinggemma', 'text') == 'embeddinggemma'
    assert chosen_plugin('video=fer_mini_xception', 'audio') is None      # left to the parameter files
    with pytest.raises(EncoderChoiceError, match='modalities argument'):
        chosen_plugin('audio=none', 'audio')
    overrides = {step.spec.name: step.overrides for step in plan(encoders='offline,text=embeddinggemma')}
    assert overrides['video_encoder']['plugin'] == 'fer_mini_xception'
    assert overrides['audio_encoder']['plugin'] == 'egemaps'
    assert overrides['text_encoder']['plugin'] == 'embeddinggemma'
    assert 'plugin' not in overrides['fusion']
    assert all('plugin' not in o for o in {s.spec.name: s.overrides for s in plan()}.values())
    assert 'encoders' in SYSTEM_ARGUMENTS      # affective_trm.launch.py encoders:=offline
    assert main(['run', '--encoders', 'offline', '--dry-run']) == 0
    assert "overrides {'plugin': 'fer_mini_xception'}" in capsys.readouterr().out
    assert main(['run', '--encoders', 'smell=nose', '--dry-run']) == 2
    assert "unknown modality 'smell'" in capsys.readouterr().err
