"""Modality names, their order in the fused feature vector and their bits in ValenceArousal.modalities."""

VIDEO = 'video'
AUDIO = 'audio'
TEXT = 'text'

# Order of the blocks in the fused input vector. [audio | video | text] is the order the seed
# checkpoint was trained with; keeping it lets the seed-compatible mode load that checkpoint.
FEATURE_ORDER = (AUDIO, VIDEO, TEXT)

# Bit values of affective_msgs/ValenceArousal.modalities (mirrors the MODALITY_* constants there).
MODALITY_BITS = {VIDEO: 1, AUDIO: 2, TEXT: 4}

# Default encoder plugin per modality (entry-point names in the 'affective_trm_ros.encoders' group).
DEFAULT_ENCODERS = {VIDEO: 'hsemotion_enet_b0', AUDIO: 'dasheng_base', TEXT: 'embeddinggemma'}


def bits_to_names(bits: int) -> list:
    """Bitmask -> present modality names in FEATURE_ORDER."""
    return [name for name in FEATURE_ORDER if bits & MODALITY_BITS[name]]


def check_modalities(names, what: str = 'modalities') -> list:
    """``names`` as a list when every one is a known modality; ValueError naming the others otherwise."""
    names = list(names)
    unknown = [name for name in names if name not in FEATURE_ORDER]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(repr(name) for name in unknown)}; "
                         f"expected some of {', '.join(FEATURE_ORDER)}")
    return names
