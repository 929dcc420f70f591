"""`affective-trm benchmark model` runs end to end and writes its table; unknown benchmarks fail clearly."""

import json

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
    assert all(r['median_ms'] > 0 and r['p99_ms'] >= r['median_ms'] for r in rows)
    assert rows[2]['params'] > rows[0]['params']


def test_benchmark_model_rejects_bad_counts(capsys):
    assert main(['benchmark', 'model', '--steps', '0']) == 2
    assert '--steps' in capsys.readouterr().err


def test_a_missing_benchmark_module_gives_a_clear_error(capsys):
    runner = benchmark._external_runner('gpu', 'affective_trm_ros.core.no_such_bench')
    assert runner(None) == 2
    assert 'gpu benchmark is not available' in capsys.readouterr().err
