"""The nodes' settings, offline: the parameters each node runs with, and the encoders they build.

Offline preparation reads the same parameter files the nodes read (``config/<node>.yaml``, then the
system file, then overrides) and builds its encoders with the nodes' own function
(:func:`~affective_trm_ros.core.encoders.loading.encoder_from_parameters`), so a store's features
come from the encoder construction, windowing and alignment the nodes run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from affective_trm_ros.core.alignment import AlignmentConfig
from affective_trm_ros.core.audio import DEFAULT_HOP_S, DEFAULT_SILENCE_THRESHOLD_DBFS, DEFAULT_WINDOW_S
from affective_trm_ros.core.encoders.loading import (
    encoder_from_parameters,
    offered_options,
    parse_encoder_options,
    plugin_class_for,
    plugin_options,
    video_faces_from_parameters,
    video_stream_id,
)
from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, VIDEO
from affective_trm_ros.offline.extraction.pipeline import VideoPath


def encoder_node(modality: str) -> str:
    """The node that encodes ``modality`` ('video' -> 'video_encoder')."""
    return f'{modality}_encoder'


@dataclass(frozen=True)
class AudioOptions:
    """The audio node's windowing parameters (and the stream format when the bag has no audio_info)."""

    window_s: float = DEFAULT_WINDOW_S
    hop_s: float = DEFAULT_HOP_S
    silence_threshold_dbfs: float = DEFAULT_SILENCE_THRESHOLD_DBFS
    sample_rate: int = 16000
    channels: int = 1
    sample_format: str = 'S16LE'

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> AudioOptions:
        defaults = cls()
        return cls(**{name: type(getattr(defaults, name))(params[name])
                      for name in cls.__dataclass_fields__ if name in params})


def node_parameters(node: str, system_config=None, overrides: Optional[Mapping[str, Any]] = None,
                    config_directory=None) -> dict:
    """The parameters ``node`` runs with: its config/<node>.yaml, the system file, then ``overrides``.

    Parameter files are read the way ``--params-file`` applies them: the ``ros__parameters`` of
    every section whose key matches the node ('/**', '/**/<node>', '<node>', '/<node>').
    """
    import yaml

    from affective_trm_ros.system import NODES_BY_NAME, SYSTEM_CONFIG, config_dir, parameter_files

    directory = Path(config_directory) if config_directory else config_dir()
    system_config = Path(system_config) if system_config else directory / SYSTEM_CONFIG
    values: dict = {}
    for path in parameter_files(NODES_BY_NAME[node], system_config if system_config.is_file() else None,
                                directory):
        document = yaml.safe_load(Path(path).read_text()) or {}
        for key, section in document.items():
            if key in ('/**', f'/**/{node}', node, f'/{node}') and isinstance(section, dict):
                values.update(section.get('ros__parameters') or {})
    values.update(overrides or {})
    return values


@dataclass
class NodeSettings:
    """What offline extraction needs to match the nodes: each encoder node's parameters, the audio
    windowing and the fusion node's alignment."""

    encoder_parameters: dict          # modality -> that encoder node's parameter values
    audio: AudioOptions = field(default_factory=AudioOptions)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Mapping[str, Any]],
                        modalities=FEATURE_ORDER) -> NodeSettings:
        """From effective node parameters: {'video_encoder': {...}, 'audio_encoder': {...}, 'fusion': {...}}.

        A modality whose encoder node has no parameters is left out.
        """
        encoders = {m: dict(parameters[encoder_node(m)]) for m in modalities
                    if parameters.get(encoder_node(m))}
        audio = AudioOptions.from_parameters(dict(parameters.get(encoder_node(AUDIO), {})))
        alignment = AlignmentConfig.from_parameters(dict(parameters.get('fusion', {})),
                                                    wait_for_audio=AUDIO in encoders)
        return cls(encoders, audio, alignment)

    @property
    def plugins(self) -> dict:
        """modality -> plugin id."""
        return {m: str(p['plugin']) for m, p in self.encoder_parameters.items()}

    @property
    def options(self) -> dict:
        """modality -> the constructor options the plugin gets (node settings it takes + encoder_options)."""
        return {m: plugin_options(plugin_class_for(m, str(p['plugin'])), offered_options(m, p),
                                  parse_encoder_options(p.get('encoder_options', '{}')))[0]
                for m, p in self.encoder_parameters.items()}

    @property
    def allow_untrained(self) -> dict:
        return {m: bool(p.get('allow_untrained', False)) for m, p in self.encoder_parameters.items()}

    @property
    def weights(self) -> dict:
        """modality -> explicit weight path (None = the cache)."""
        return {m: str(p.get('weights', '') or '') or None for m, p in self.encoder_parameters.items()}

    def load_encoders(self, device: Optional[str] = None) -> dict:
        """The encoders, built exactly as the nodes build theirs (``device`` overrides the parameters)."""
        return {m: encoder_from_parameters(m, self.encoder_parameters[m], device=device)
                for m in FEATURE_ORDER if m in self.encoder_parameters}

    def video_path(self, encoders: Mapping[str, Any]) -> Optional[VideoPath]:
        """The video node's face path for the loaded video encoder (None without video)."""
        params = self.encoder_parameters.get(VIDEO)
        encoder = encoders.get(VIDEO)
        if params is None or encoder is None:
            return None
        return VideoPath(make_faces=lambda: video_faces_from_parameters(encoder, params),
                         stream_id=lambda track_id: video_stream_id(params, track_id),
                         single_person=int(params.get('max_faces', 1)) == 1)
