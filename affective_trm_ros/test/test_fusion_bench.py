"""The fusion benchmark runs the node's pipeline (aligner + batched predictor) and reports sane numbers."""

import argparse
import json

from affective_trm_ros.core.predictor import FusionPredictor
from affective_trm_ros.benchmarks import fusion as fusion_bench


def test_measure_counts_every_released_frame(tmp_path):
    from test_fusion_node import make_checkpoint
    predictor = FusionPredictor(make_checkpoint(tmp_path / 'tiny.pt'), device='cpu')
    result = fusion_bench.measure(predictor, streams=2, fps=30.0, seconds=1.0, pace=False)
    timed_frames = 2 * 30
    # Frames still waiting for audio at the end (at most max_wait_s of them) are not counted.
    assert timed_frames - 2 * 20 <= result['outputs'] <= timed_frames + 2 * fusion_bench.WARMUP_FRAMES
    assert len(result['ticks']) == 30 and len(result['frames']) == result['outputs']
    assert all(t >= 0 for t in result['steps']) and len(result['steps']) > 0
    assert sorted(predictor.streams()) == ['person0', 'person1']


def test_run_writes_json(tmp_path):
    from test_fusion_node import make_checkpoint
    parser = argparse.ArgumentParser()
    fusion_bench.add_arguments(parser)
    out = tmp_path / 'bench.json'
    args = parser.parse_args(['--checkpoint', make_checkpoint(tmp_path / 'tiny.pt'), '--seconds', '0.5',
                              '--no-pace', '--json', str(out)])
    assert fusion_bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report['step']['n'] > 0 and report['step']['p50'] <= report['step']['p99']
    assert report['fps'] == 30.0 and report['device'] == 'cpu'
    bad = parser.parse_args(['--streams', '0'])
    assert fusion_bench.run(bad) == 2
