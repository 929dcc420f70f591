"""The encoder options every command that builds encoders shares (``prepare``, ``replay``, ``demo``, ``run``).

Not a subcommand: a helper the commands call, so ``--encoders``, ``--<modality>-encoder``,
``--<modality>-weights`` and ``--allow-untrained`` mean the same everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Optional

from affective_trm_ros.core.encoders.sets import (
    NONE,
    describe_sets,
    explicitly_chosen,
    resolve_encoder_choice,
)
from affective_trm_ros.core.modalities import FEATURE_ORDER

ENCODERS_HELP = (f'encoder set and/or per-modality plugins: a set name ({describe_sets()}), '
                 f'modality=PLUGIN pairs (video=fer_mini_xception,audio={NONE}), '
                 f'or both (offline,text=minilm)')


def add_encoder_arguments(parser: argparse.ArgumentParser, *, default_note: str = 'the nodes\' configuration '
                          '(config/*.yaml: the default set)') -> None:
    group = parser.add_argument_group(f'encoders (default: {default_note})')
    group.add_argument('--encoders', metavar='CHOICE', default=None, help=ENCODERS_HELP)
    for modality in FEATURE_ORDER:
        group.add_argument(f'--{modality}-encoder', metavar='PLUGIN', default=None,
                           help=f"{modality} encoder plugin id (over --encoders), "
                                f"or '{NONE}' to leave {modality} out")
    for modality in FEATURE_ORDER:
        group.add_argument(f'--{modality}-weights', metavar='PATH', default=None,
                           help=f'{modality} encoder weight file or folder (default: the weights cache)')
    group.add_argument('--allow-untrained', action='store_true',
                       help='run encoders whose weights are missing with random weights (smoke tests only; '
                            'a set member whose weights are missing gives way to one with real weights here)')


def encoder_node_parameters(args: argparse.Namespace, base: Mapping[str, Mapping]) -> tuple:
    """The encoder nodes' parameters with the command line on top: ``({node: params}, notes)``.

    ``base``: ``{'video_encoder': {...}, ...}`` (the parameter files' values; every modality's node).
    A modality set to ``none`` has no entry in the result. ``notes``: lines to print (encoders replaced
    because their weights are missing and random weights were allowed).
    """
    from affective_trm_ros.core.encoders.loading import prefer_trained

    per_modality = {m: getattr(args, f'{m}_encoder', None) for m in FEATURE_ORDER}
    configured = {m: str(base.get(f'{m}_encoder', {}).get('plugin', '') or '') or None for m in FEATURE_ORDER}
    plugins = resolve_encoder_choice(args.encoders, base={m: p for m, p in configured.items() if p},
                                     **per_modality)
    notes: list = []
    if args.allow_untrained:
        plugins, notes = prefer_trained(plugins, keep=explicitly_chosen(args.encoders, **per_modality))
    parameters = {}
    for modality, plugin in plugins.items():
        if plugin is None:
            continue
        node = f'{modality}_encoder'
        values = dict(base.get(node, {}))
        values['plugin'] = plugin
        if args.allow_untrained:
            values['allow_untrained'] = True
        weights = getattr(args, f'{modality}_weights', None)
        if weights:
            values['weights'] = str(weights)
        parameters[node] = values
    return parameters, notes


class EncodersUnavailable(RuntimeError):
    """An encoder could not be built; the message says which and what the user can do."""


def load_encoders(parameters: Mapping[str, Mapping], device: Optional[str] = None,
                  set_flag: str = '--encoders') -> dict:
    """``{modality: Encoder}`` from ``{modality: encoder node parameters}`` (NodeSettings.encoder_parameters).

    Weight files are looked for before any model loads: every encoder whose weights are missing
    (and not allowed to run untrained) is named in one :class:`EncodersUnavailable`, with the
    command-line fixes.
    """
    from affective_trm_ros.core.encoders.base import WeightsNotFoundError
    from affective_trm_ros.core.encoders.loading import (
        alternatives_advice,
        encoder_from_parameters,
        has_real_weights,
        missing_weights_advice,
    )

    def advice(modality: str, params: Mapping) -> str:
        return missing_weights_advice(modality, str(params['plugin']), weights_flag=f'--{modality}-weights')

    missing = [advice(m, p) for m, p in parameters.items()
               if not p.get('allow_untrained') and not has_real_weights(str(p['plugin']), p.get('weights'))]
    if missing:
        raise EncodersUnavailable('missing weights:\n  ' + '\n  '.join(missing)
                                  + f'\n  {alternatives_advice(set_flag)}')
    encoders = {}
    for modality in FEATURE_ORDER:
        params = parameters.get(modality)
        if not params:
            continue
        try:
            encoders[modality] = encoder_from_parameters(modality, params, device=device)
        except WeightsNotFoundError as error:
            raise EncodersUnavailable(f'{_first_sentence(error)}\n  {advice(modality, params)}\n  '
                                      f'{alternatives_advice(set_flag)}') from None
    return encoders


def _first_sentence(error: Exception) -> str:
    """The part of a weights error that says what is missing and where (the rest is Python advice)."""
    text = str(error)
    cut = text.find('. ')
    return text if cut < 0 else text[:cut + 1]


def untrained_line(encoders: Mapping) -> str:
    """The first line a command prints: which of the loaded encoders run with random weights."""
    from affective_trm_ros.core.encoders import loading

    return loading.untrained_line({m: e.identity for m, e in encoders.items()})
