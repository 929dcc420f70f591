"""`affective-trm weights [list|fetch|verify]`: the pretrained weight files the suite knows about.

``list`` shows, for each modality, which encoder plugins have their real weights on this machine
right now, then every known file with its source URL, size, SHA-256 and whether it is present in the
cache directory ($AFFECTIVE_TRM_WEIGHTS, default ~/.cache/affective_trm/weights) or in its pip
package. ``fetch`` downloads missing files (network needed; progress bar; atomic rename; checksum
verified, or recorded at first fetch where none is published). ``verify`` re-hashes present files
against those checksums (pip-shipped files: against the package's RECORD). An unknown name prints
the known ones and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from affective_trm_ros.core.encoders import weights as registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('action', nargs='?', choices=('list', 'fetch', 'verify'), default='list',
                        help='list (default): show known files; fetch: download missing ones; '
                             'verify: check present files against their SHA-256')
    parser.add_argument('names', nargs='*', metavar='NAME',
                        help=f"weight names (default: all; fetch: all but gated ones). Known: "
                             f"{', '.join(registry.KNOWN_WEIGHTS)}")
    parser.add_argument('--force', action='store_true', help='fetch: download again even if present')
    parser.add_argument('--no-progress', action='store_true', help='fetch: no progress bars')


def _size(entry: registry.WeightFile) -> str:
    if entry.size is None:
        return 'unknown'
    return f'{entry.size / 1e6:.1f} MB'


def _unknown(names: list) -> list:
    return [name for name in names if name not in registry.KNOWN_WEIGHTS]


def plugins_by_modality() -> dict:
    """modality -> [(plugin id, weights name or None, status)] for every installed encoder plugin."""
    from affective_trm_ros.core.encoders.base import available_encoders, plugin_weights_status

    table: dict = {}
    for plugin_id in sorted(available_encoders()):
        try:
            modality, name, status = plugin_weights_status(plugin_id)
        except Exception as err:  # noqa: BLE001 - a broken third-party plugin must not hide the others
            modality, name, status = '?', None, f'cannot load the plugin: {err}'
        table.setdefault(modality, []).append((plugin_id, name, status))
    return table


def print_plugin_table() -> None:
    print('real weights on this machine, per modality:')
    for modality, rows in sorted(plugins_by_modality().items()):
        ready = [plugin for plugin, _, status in rows if status == 'present']
        print(f"  {modality}: {', '.join(ready) if ready else 'none (only allow_untrained runs)'}")
        for plugin, name, status in rows:
            detail = f'{name}: {status}' if name else status
            hint = f'; get it: {registry.fetch_command(name)}' if status == 'missing' else ''
            print(f'    {plugin:<22} {detail}{hint}')


def list_weights(names: list, plugins: bool = True) -> int:
    if plugins:
        print_plugin_table()
        print()
    print(f'weights directory: {registry.weights_dir()} (override with ${registry.ENV_VAR})')
    recorded = registry.recorded_checksums()
    for name in names:
        entry = registry.known(name)
        present = registry.is_present(name)
        if entry.pip_package:
            sha = registry.PIP_SHA
        elif entry.sha256:
            sha = f'{entry.sha256} (published)'
        elif name in recorded:
            sha = f'{recorded[name]} (recorded at first fetch)'
        else:
            sha = registry.UNKNOWN_SHA
        print(f"\n{name}  [{'present' if present else 'MISSING'}]")
        print(f'  {entry.description}')
        print(f"  used by: {', '.join(entry.used_by)}")
        print(f'  path:    {registry.expected_path(name)}')
        if entry.pip_package:
            print(f'  source:  pip package {entry.pip_package} ({entry.url})')
        else:
            print(f'  source:  {entry.url}')
            for mirror in entry.mirrors:
                print(f'  or:      {mirror}')
            print(f'  size:    {_size(entry)}')
        print(f'  sha256:  {sha}')
        if entry.note:
            print(f'  note:    {entry.note}')
        if not present:
            print(f'  get it:  {registry.fetch_command(name)}')
    return 0


def fetch_weights(names: list, explicit: bool, force: bool, progress: bool) -> int:
    failures = 0
    for name in names:
        entry = registry.known(name)
        if not explicit and (entry.note.startswith('gated') or entry.pip_package):
            if not registry.is_present(name):
                print(f'{name}: skipped ({entry.note or "pip package"}); fetch it by name: '
                      f'{registry.fetch_command(name)}')
            continue
        try:
            path = registry.fetch(name, force=force, progress=progress)
        except (OSError, ValueError, PermissionError) as err:
            failures += 1
            print(f'{name}: FAILED: {err}', file=sys.stderr)
            continue
        print(f'{name}: {path}')
    return 1 if failures else 0


def verify_weights(names: list) -> int:
    bad = 0
    for name in names:
        result = registry.verify(name)
        line = f'{name}: {result.status}'
        if result.status == 'mismatch' and registry.known(name).pip_package:
            bad += 1
            line += (f' ({result.actual} differ from the pip RECORD); reinstall: '
                     f'pip install --force-reinstall '
                     f'--no-deps {registry.known(name).pip_package}')
        elif result.status == 'mismatch':
            bad += 1
            line += f' (expected {result.expected}, got {result.actual}); delete it and fetch again'
        elif result.status == 'unverified':
            line += f' (no reference checksum; sha256 {result.actual})'
        print(line)
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    unknown = _unknown(args.names)
    if unknown:
        print(f"unknown weight name(s): {', '.join(unknown)}; known: {', '.join(registry.KNOWN_WEIGHTS)}",
              file=sys.stderr)
        return 2
    names = args.names or list(registry.KNOWN_WEIGHTS)
    if args.action == 'list':
        return list_weights(names, plugins=not args.names)
    if args.action == 'fetch':
        return fetch_weights(names, explicit=bool(args.names), force=args.force,
                             progress=not args.no_progress)
    return verify_weights(names)
