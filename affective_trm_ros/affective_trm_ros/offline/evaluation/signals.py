"""Do the encoders' outputs carry the labels they should? Per-session correlations.

Before a fusion model is blamed (or praised), check its inputs: on sessions whose labels are known,
correlate a named, interpretable read-out of each encoder with the label it should follow:

* ``fer_mini_xception`` (its last 7 values are FER2013 class probabilities):
  valence ~ P(happy) - P(sad) - P(angry) - P(fear) - P(disgust);
  arousal ~ P(surprise) + P(fear) + P(angry) - P(sad) - P(neutral);
* ``egemaps`` (openSMILE eGeMAPSv02 functionals): arousal ~ loudness (``loudness_sma3_amean``) and
  ~ mean pitch (``F0semitoneFrom27.5Hz_sma3nz_amean``);
* a text encoder (any sentence embedding): valence ~ cosine similarity to a positive minus a
  negative anchor sentence, embedded by the same encoder (``text_anchors``).

Only frames where the modality is present (mask) and the label is known count. Pearson r per
session and over all sessions pooled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import numpy as np

from affective_trm_ros.core.metrics import pearson

FER_CLASSES = ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral')
EGEMAPS_LOUDNESS = 'loudness_sma3_amean'
EGEMAPS_PITCH = 'F0semitoneFrom27.5Hz_sma3nz_amean'
# Anchor sentences for the text read-out (not in any sample-session sentence bank).
POSITIVE_ANCHOR = 'I feel happy, glad and delighted.'
NEGATIVE_ANCHOR = 'I feel sad, upset and miserable.'


def fer_readouts(features: np.ndarray) -> dict:
    """Valence and arousal read-outs from fer_mini_xception embeddings (N, 135)."""
    probabilities = np.asarray(features, np.float64)[:, -len(FER_CLASSES):]
    p = {name: probabilities[:, k] for k, name in enumerate(FER_CLASSES)}
    return {
        ('valence', 'P(happy) - P(sad, angry, fear, disgust)'):
            p['happy'] - p['sad'] - p['angry'] - p['fear'] - p['disgust'],
        ('arousal', 'P(surprise, fear, angry) - P(sad, neutral)'):
            p['surprise'] + p['fear'] + p['angry'] - p['sad'] - p['neutral'],
    }


def egemaps_readouts(features: np.ndarray, feature_names: Optional[list] = None) -> dict:
    """Arousal read-outs from egemaps embeddings (N, 88): loudness and mean pitch."""
    names = feature_names or egemaps_feature_names()
    features = np.asarray(features, np.float64)
    out = {}
    for column, name in ((EGEMAPS_LOUDNESS, 'loudness'), (EGEMAPS_PITCH, 'mean F0')):
        if column in names:
            out[('arousal', name)] = features[:, names.index(column)]
    return out


def egemaps_feature_names() -> list:
    """The 88 eGeMAPSv02 functional names in openSMILE's order."""
    import opensmile

    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                            feature_level=opensmile.FeatureLevel.Functionals)
    return list(smile.feature_names)


def text_anchors(encoder) -> tuple:
    """(positive, negative) anchor embeddings from a loaded text encoder."""
    result = encoder.encode_batch([POSITIVE_ANCHOR, NEGATIVE_ANCHOR])
    return np.asarray(result.embeddings[0], np.float64), np.asarray(result.embeddings[1], np.float64)


def text_readouts(features: np.ndarray, anchors: tuple) -> dict:
    """Valence read-out of sentence embeddings: cos(positive anchor) - cos(negative anchor)."""
    features = np.asarray(features, np.float64)
    norms = np.linalg.norm(features, axis=1) + 1e-12
    positive, negative = anchors
    score = features @ (positive / np.linalg.norm(positive)) / norms \
        - features @ (negative / np.linalg.norm(negative)) / norms
    return {('valence', 'cos(positive anchor) - cos(negative anchor)'): score}


def readouts_for(plugin: str, features: np.ndarray, *, egemaps_names: Optional[list] = None,
                 anchors: Optional[tuple] = None) -> dict:
    """{(label, read-out name): (N,) values} for a plugin's features; {} when none is defined."""
    if plugin == 'fer_mini_xception':
        return fer_readouts(features)
    if plugin == 'egemaps':
        return egemaps_readouts(features, egemaps_names)
    if anchors is not None and plugin in ('minilm', 'embeddinggemma'):
        return text_readouts(features, anchors)
    return {}


def encoder_label_correlations(sessions: Mapping[str, tuple], spec: list, *,
                               egemaps_names: Optional[list] = None, anchors: Optional[tuple] = None) -> dict:
    """Pearson r between each encoder read-out and its label, per session and pooled.

    ``sessions``: session id -> (features {modality: (T, dim)}, mask (T, M) in ``spec`` order,
    labels (T, 2)). Returns ``{'<modality> <plugin>: <read-out> ~ <label>': {'sessions': {id: r},
    'pooled': r, 'frames': n}}``.
    """
    table: dict = {}
    pooled: dict = {}
    for sid, (features, mask, labels) in sessions.items():
        labels = np.asarray(labels, np.float64)
        for column, entry in enumerate(spec):
            modality, plugin = entry['modality'], entry['encoder']
            present = np.asarray(mask, bool)[:, column]
            for (label, name), values in readouts_for(plugin, features[modality], egemaps_names=egemaps_names,
                                                      anchors=anchors).items():
                target = labels[:, 0 if label == 'valence' else 1]
                keep = present & np.isfinite(target) & np.isfinite(values)
                key = f'{modality} {plugin}: {name} ~ {label}'
                row = table.setdefault(key, {'sessions': {}, 'pooled': math.nan, 'frames': 0})
                row['sessions'][sid] = pearson(values[keep], target[keep]) if keep.sum() > 2 else math.nan
                row['frames'] += int(keep.sum())
                pooled.setdefault(key, ([], []))
                pooled[key][0].append(values[keep])
                pooled[key][1].append(target[keep])
    for key, (values, targets) in pooled.items():
        values, targets = np.concatenate(values), np.concatenate(targets)
        table[key]['pooled'] = pearson(values, targets) if values.size > 2 else math.nan
    return table


def correlations_markdown(table: Mapping[str, dict]) -> str:
    """A Markdown table: one row per read-out, pooled r and r per session."""
    if not table:
        return '_No encoder read-out is defined for these encoders._'
    sessions = sorted({sid for row in table.values() for sid in row['sessions']})
    lines = ['| encoder read-out ~ label | pooled r | ' + ' | '.join(sessions) + ' |',
             '|---|---|' + '---|' * len(sessions)]
    for key, row in table.items():
        cells = ' | '.join(_fmt(row['sessions'].get(sid)) for sid in sessions)
        lines.append(f"| {key} | {_fmt(row['pooled'])} | {cells} |")
    return '\n'.join(lines)


def _fmt(value) -> str:
    return 'n/a' if value is None or not math.isfinite(value) else f'{value:+.2f}'
