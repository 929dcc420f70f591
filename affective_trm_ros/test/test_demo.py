"""The main job end to end on reduced durations: report with finite metrics and full coverage; a
second run reuses every stage."""

import json
import math

import pytest

from affective_trm_ros.cli import main as cli_main
from affective_trm_ros.offline.synthetic import sample_sessions as ss

pytestmark = [pytest.mark.skipif(not ss.espeak_available(), reason='espeak-ng is not installed'),
              pytest.mark.timeout(900)]


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory, monkeypatch_module):
    # No weight files on test machines: video/audio run untrained (opt-in), text falls back to MiniLM.
    monkeypatch_module.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path_factory.mktemp('no_weights')))
    out = tmp_path_factory.mktemp('demo')
    assert cli_main(['demo', '--quick', '--quiet', '--out', str(out)]) == 0
    return out


@pytest.fixture(scope='module')
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_demo_writes_a_complete_report(demo_dir):
    report = json.loads((demo_dir / 'report' / 'report.json').read_text())
    assert report['coverage'] == 1.0
    assert report['frames'] == report['frames_with_estimate'] == 50   # 5 s at 10 FPS
    for model, metrics in report['baseline'].items():
        for dimension in ('valence', 'arousal'):
            values = metrics[dimension]
            assert math.isfinite(values['ccc']) and math.isfinite(values['rmse']), model
    assert 'memoryless MLP baseline' in report['baseline']
    assert report['untrained_encoders'].keys() == {'video', 'audio'}
    assert report['encoders']['text'].startswith('minilm@')
    first_line = (demo_dir / 'report' / 'report.md').read_text().splitlines()[0]
    assert first_line.startswith('UNTRAINED encoders') and 'hsemotion_enet_b0' in first_line
    for name in ('va_plane.png', 'estimates.csv', 'estimates_bag'):
        assert (demo_dir / 'report' / name).exists()
    assert len(list((demo_dir / 'report').glob('timeseries_*.png'))) == 1
    # offline run of the checkpoint over the features the nodes published = what the nodes published
    nodes = report['baseline']['stateful TRM, through the ROS 2 nodes']
    offline = report['baseline']['stateful TRM, offline on the same features']
    for dimension in ('valence', 'arousal'):
        assert offline[dimension]['rmse'] == pytest.approx(nodes[dimension]['rmse'], abs=1e-5)


def test_second_run_reuses_every_stage(demo_dir, capsys):
    capsys.readouterr()
    assert cli_main(['demo', '--quick', '--quiet', '--out', str(demo_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count('reused') >= 3 + 2 + 2 + 1   # sessions, features, models, replay
    assert 'memoryless MLP baseline' in out and 'coverage 100.00 %' in out
    assert json.loads((demo_dir / 'latest.json').read_text())['checkpoint'].endswith('.pt')


def test_live_mode_needs_a_trained_checkpoint(tmp_path, capsys):
    assert cli_main(['demo', '--live', '--out', str(tmp_path)]) == 2
    assert 'run `affective-trm demo` first' in capsys.readouterr().err
