"""The fusion benchmark runs the node's runtime (stream table + batched predictor) and counts right."""

import argparse
import json

import pytest

from affective_trm_ros.benchmarks import fusion as fusion_bench
from affective_trm_ros.core.alignment import AlignmentConfig
from affective_trm_ros.core.predictor import FusionPredictor


def parser():
    result = argparse.ArgumentParser()
    fusion_bench.add_arguments(result)
    return result


def test_measure_counts_every_released_frame(tmp_path):
    from test_fusion_node import make_checkpoint
    predictor = FusionPredictor(make_checkpoint(tmp_path / 'tiny.pt'), device='cpu')
    causal = fusion_bench.measure(predictor, streams=2, fps=30.0, seconds=1.0, pace=False,
                                  alignment=AlignmentConfig(audio_policy='causal'))
    assert causal['outputs'] == 2 * 30                  # never waits: every timed frame, at once
    assert len(causal['steps']) == 30                   # one serving call per tick for both people
    assert len(causal['ticks']) == 30 and len(causal['frames']) == 60
    assert sorted(predictor.streams()) == ['person0', 'person1']
    nearest = fusion_bench.measure(FusionPredictor(make_checkpoint(tmp_path / 'tiny2.pt'), device='cpu'),
                                   streams=2, fps=30.0, seconds=1.0, pace=False)
    # nearest waits for the audio after a frame (or max_wait_s): the last ~0.6 s are still waiting
    assert 2 * 20 <= nearest['outputs'] <= 2 * 45


def test_people_mode_times_one_batched_step_per_size(tmp_path):
    from test_fusion_node import make_checkpoint
    predictor = FusionPredictor(make_checkpoint(tmp_path / 'tiny.pt'), device='cpu')
    sizes = []
    original = predictor.step
    predictor.step = lambda items, resets=None: sizes.append(len(items)) or original(items, resets)
    rows = fusion_bench.measure_people(predictor, [1, 3], steps=2, warmup=1)
    assert sizes == ([1] * 3 + [3] * 3) * 3             # 3 interleaved passes, warm-up + timed steps
    assert [r['people'] for r in rows] == [1, 3] and rows[0]['ratio'] == 1.0
    assert rows[1]['per_person_ms'] == rows[1]['median_ms'] / 3
    assert predictor.streams() == []                     # states freed after timing


def test_run_reports_percentiles_of_the_measured_times(tmp_path, monkeypatch):
    """run() turns measured seconds into ms statistics: exact values on constructed timings."""
    from test_fusion_node import make_checkpoint
    measured = {'steps': [k / 1000 for k in range(1, 101)], 'frames': [0.004, 0.002], 'ticks': [0.01, 0.05],
                'on_time': 1, 'outputs': 2, 'wall_s': 1.0}
    monkeypatch.setattr(fusion_bench, 'measure', lambda predictor, **kwargs: measured)
    parser = argparse.ArgumentParser()
    fusion_bench.add_arguments(parser)
    out = tmp_path / 'bench.json'
    args = parser.parse_args(['--checkpoint', make_checkpoint(tmp_path / 'tiny.pt'), '--json', str(out)])
    assert fusion_bench.run(args) == 0
    report = json.loads(out.read_text())
    # 1, 2, ..., 100 ms: linear-interpolated p50 50.5, p99 1 + 0.99 * 99 = 99.01.
    assert report['step'] == {'p50': pytest.approx(50.5), 'p99': pytest.approx(99.01),
                              'mean': pytest.approx(50.5), 'n': 100}
    assert report['frame'] == {'p50': pytest.approx(3.0), 'p99': pytest.approx(3.98),
                               'mean': pytest.approx(3.0), 'n': 2}
    assert report['keeps_up'] == 0.5 and report['outputs'] == 2
    assert fusion_bench._percentiles([])['n'] == 0


def test_run_writes_json(tmp_path):
    from test_fusion_node import make_checkpoint
    checkpoint = make_checkpoint(tmp_path / 'tiny.pt')
    out = tmp_path / 'bench.json'
    args = parser().parse_args(['--checkpoint', checkpoint, '--seconds', '0.5', '--no-pace',
                                '--audio-policy', 'causal', '--json', str(out)])
    assert fusion_bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report['step']['n'] == 15 and report['outputs'] == 15
    assert report['fps'] == 30.0 and report['device'] == 'cpu' and report['audio_policy'] == 'causal'
    people = tmp_path / 'people.json'
    args = parser().parse_args(['--checkpoint', checkpoint, '--people', '1,2', '--steps', '3',
                                '--json', str(people)])
    assert fusion_bench.run(args) == 0
    assert [r['people'] for r in json.loads(people.read_text())['people']] == [1, 2]
    assert fusion_bench.run(parser().parse_args(['--streams', '0'])) == 2
    assert fusion_bench.run(parser().parse_args(['--people', '0,2'])) == 2
