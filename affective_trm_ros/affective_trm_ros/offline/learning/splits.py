"""Seeded train/validation/test splits; speaker-independent by default.

With ``by='speaker'`` every speaker's sessions land in exactly one split, so a model is never
evaluated on a person it was trained on. Speakers are shuffled with the seed and dealt into the
splits until each split holds about its fraction of the *sessions*.
"""

from __future__ import annotations

import random

SPLIT_NAMES = ('train', 'val', 'test')
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SPLIT_SEED = 0


def make_splits(
    speakers: dict, fractions=DEFAULT_FRACTIONS, seed: int = DEFAULT_SPLIT_SEED, by: str = 'speaker'
) -> dict:
    """Split sessions into train/val/test.

    ``speakers``: session id -> speaker id. ``fractions``: (train, val, test), summing to 1.
    ``by``: 'speaker' (no speaker in two splits) or 'session' (sessions shuffled independently).
    Returns ``{'train': [...], 'val': [...], 'test': [...]}`` with sorted session ids. With at least
    as many groups as non-zero fractions, every split with a non-zero fraction gets one group.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f'split fractions must be three non-negative numbers summing to 1, got {fractions}')
    if by not in ('speaker', 'session'):
        raise ValueError(f"split 'by' must be 'speaker' or 'session', got {by!r}")
    groups: dict = {}
    for session_id, speaker in sorted(speakers.items()):
        key = str(speaker) if by == 'speaker' else session_id
        groups.setdefault(key, []).append(session_id)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)

    total = sum(len(members) for members in groups.values())
    targets = [fraction * total for fraction in fractions]
    wanted = [index for index, fraction in enumerate(fractions) if fraction > 0]
    assigned: list = [[] for _ in SPLIT_NAMES]
    counts = [0] * len(SPLIT_NAMES)
    remaining = list(keys)
    # Seed every wanted split with one group (smallest splits first) when there are enough groups.
    if len(remaining) >= len(wanted):
        for index in sorted(wanted, key=lambda i: fractions[i]):
            key = remaining.pop()
            assigned[index].append(key)
            counts[index] += len(groups[key])
    for key in remaining:
        # Give the group to the split furthest below its target (relative to the target).
        index = max(wanted, key=lambda i: (targets[i] - counts[i]) / max(targets[i], 1e-9))
        assigned[index].append(key)
        counts[index] += len(groups[key])
    return {
        name: sorted(sid for key in assigned[index] for sid in groups[key])
        for index, name in enumerate(SPLIT_NAMES)
    }


def split_speakers(splits: dict, speakers: dict) -> dict:
    """Split name -> sorted speaker ids in it (handy for reports and for checking independence)."""
    return {name: sorted({str(speakers[sid]) for sid in ids}) for name, ids in splits.items()}
