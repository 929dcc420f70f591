"""The main job end to end on reduced durations (real-weight offline encoders): a report with
finite metrics for every model, the TRM through the nodes equal to the same checkpoint offline, a
TRM that beats the trivial predictor on validation; a second run reuses every stage."""

import json
import math

import pytest

from affective_trm_ros.cli import main as cli_main
from affective_trm_ros.offline.synthetic import sample_sessions as ss

pytestmark = [pytest.mark.skipif(not ss.espeak_available(), reason='espeak-ng is not installed'),
              pytest.mark.timeout(900)]


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory, monkeypatch_module):
    # No downloaded weights on test machines: 'auto' picks the offline set (weights from pip).
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
    first_line = (demo_dir / 'report' / 'report.md').read_text().splitlines()[0]
    assert first_line.startswith('Encoders (offline set), all with their published weights')
    for name in ('fer_mini_xception@', 'egemaps@', 'minilm@'):
        assert name in first_line
    assert report['untrained_encoders'] == {}
    for model, entry in report['models'].items():
        for dimension in ('valence', 'arousal', 'mean'):
            assert math.isfinite(entry[dimension]['ccc_mean']), model
    assert all(r['coverage'] == 1.0 and r['frames'] == 50 for r in report['replays'])  # 5 s at 10 FPS
    nodes = report['models']['stateful TRM, through the ROS 2 nodes']
    offline = report['models']['stateful TRM, offline on the same features']
    for dimension in ('valence', 'arousal'):  # the nodes publish what the checkpoint computes offline
        assert offline[dimension]['ccc_mean'] == pytest.approx(nodes[dimension]['ccc_mean'], abs=1e-4)
    trivial = report['models']['trivial: training-label mean']['mean']['ccc_mean']
    assert trivial == pytest.approx(0.0, abs=1e-6)
    assert report['confidence_vs_error']['n'] > 0 and report['encoder_signals']
    trm = json.loads(next((demo_dir / 'models').glob('trm_seed0_*/done.json')).read_text())
    assert trm['best_val_ccc'] > 0.05  # above the trivial predictor (CCC 0) on validation


def test_second_run_reuses_every_stage(demo_dir, capsys):
    capsys.readouterr()
    assert cli_main(['demo', '--quick', '--quiet', '--out', str(demo_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count('reused') >= 4 + 3 + 2 + 1   # sessions, features, models, replay
    assert 'memoryless MLP baseline' in out and 'coverage through the nodes: 100.00 %' in out
    assert json.loads((demo_dir / 'latest.json').read_text())['checkpoint'].endswith('.pt')


def test_live_mode_needs_a_trained_checkpoint(tmp_path, capsys):
    assert cli_main(['demo', '--live', '--out', str(tmp_path)]) == 2
    assert 'run `affective-trm demo` first' in capsys.readouterr().err


def test_training_in_worker_processes_gives_the_same_models(demo_dir, tmp_path):
    import dataclasses

    import torch

    from affective_trm_ros import main_job
    from affective_trm_ros.offline.learning.train import TrainConfig

    store_root = next((demo_dir / 'features').iterdir())
    ids = sorted(p.stem for p in (store_root / 'sessions').iterdir())
    splits = {'train': ids[:-1], 'val': ids[-1:], 'test': []}
    config = TrainConfig(model='trm', model_config=dict(main_job.DEMO_TRM), steps=4, eval_every=2,
                         batch_size=2, window=8, crop_frames=24, device='cpu', splits=splits,
                         progress=False, plots=False)
    jobs = [((kind, 0), dataclasses.replace(config, model=kind, model_config=dict(model_config)))
            for kind, model_config in (('trm', main_job.DEMO_TRM), ('mlp', main_job.DEMO_MLP))]

    def run(workers, folder):
        placed = [(job, dataclasses.replace(c, out_dir=str(tmp_path / folder / job[0]))) for job, c in jobs]
        return dict(main_job._run_training(store_root, placed, workers))

    serial, parallel = run(1, 'serial'), run(2, 'parallel')
    assert set(serial) == set(parallel) == {('trm', 0), ('mlp', 0)}
    for job in serial:
        a = torch.load(serial[job]['checkpoint'], weights_only=False)['state_dict']
        b = torch.load(parallel[job]['checkpoint'], weights_only=False)['state_dict']
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), job
        assert serial[job]['best_val_ccc'] == parallel[job]['best_val_ccc']
