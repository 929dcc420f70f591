"""`affective-trm benchmark model` runs end to end and writes its table; unknown benchmarks fail clearly."""

import json
from types import SimpleNamespace

import pytest

from affective_trm_ros.cli import main
from affective_trm_ros.commands import benchmark


def test_benchmark_model_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    code = main(['benchmark', 'model', '--steps', '2', '--warmup', '0', '--batch', '2', '--threads', '1',
                 '--json', str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert 'stateful TRM (default)' in text and 'seed TRM' in text and 'p99 ms' in text
    rows = json.loads(out.read_text())
    assert [(r['model'], r['batch']) for r in rows] == [
        ('stateful TRM (default)', 1), ('stateful TRM (default)', 2), ('seed TRM', 1), ('seed TRM', 2)]
    assert all(r['steps'] == 2 and r['threads'] == 1 for r in rows)
    assert rows[2]['params'] > rows[0]['params']
    assert 'serving ms' in text and all(r['serving_median_ms'] > 0 for r in rows)


def test_serving_timing_runs_the_predictor_with_that_many_streams():
    """The serving column times FusionPredictor.step with one item per stream (NumPy in and out)."""
    from affective_trm_ros.benchmarks.fusion import time_model_serving
    from affective_trm_ros.core.trm import StatefulTRM, TRMConfig

    model = StatefulTRM(TRMConfig(modality_dims={'audio': 4, 'video': 6, 'text': 3}, hidden_size=8,
                                  num_heads=2))
    batches = []
    original = model.step
    model.step = lambda x, mask, state: batches.append(x.shape[0]) or original(x, mask, state)
    stats = time_model_serving(model, 3, steps=4, warmup=1, device='cpu')
    assert batches == [3] * 5 and stats['people'] == 3 and stats['steps'] == 4


def test_time_steps_reports_the_statistics_of_the_timed_steps_only(monkeypatch):
    """A fake clock that advances only inside model.step: the statistics are then exact."""
    import torch

    from affective_trm_ros.core.trm import StatefulTRM, TRMConfig

    model = StatefulTRM(TRMConfig(modality_dims={'audio': 4, 'video': 4}, hidden_size=8, num_heads=2)).eval()
    durations = iter([0.100, 0.005, 0.001, 0.004, 0.002, 0.003])  # seconds; the first is the warm-up step
    now = [0.0]
    real_step = model.step

    def step(*args):
        now[0] += next(durations)
        return real_step(*args)

    monkeypatch.setattr(model, 'step', step)
    monkeypatch.setattr(benchmark, 'time', SimpleNamespace(perf_counter=lambda: now[0]))
    stats = benchmark.time_steps(model, batch_size=2, steps=5, warmup=1, device=torch.device('cpu'))
    # 5, 1, 4, 2, 3 ms: median 3, p99 4 + 0.96 * (5 - 4) = 4.96 (linear interpolation), mean 3.
    assert stats == {'batch': 2, 'median_ms': pytest.approx(3.0), 'p99_ms': pytest.approx(4.96),
                     'mean_ms': pytest.approx(3.0), 'steps': 5}


def test_benchmark_model_rejects_bad_counts(capsys):
    assert main(['benchmark', 'model', '--steps', '0']) == 2
    assert '--steps' in capsys.readouterr().err


def test_a_missing_benchmark_module_gives_a_clear_error(capsys):
    runner = benchmark._external_runner('gpu', 'affective_trm_ros.core.no_such_bench')
    assert runner(None) == 2
    assert 'gpu benchmark is not available' in capsys.readouterr().err
