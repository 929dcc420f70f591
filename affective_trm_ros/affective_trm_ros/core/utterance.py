"""Speech text before the text encoder: the one rule the text node and offline extraction share."""

from __future__ import annotations

# Longest utterance passed to the encoder, in characters: well above a spoken sentence or a
# paragraph of recogniser output, and below the point where tokenising a runaway message costs
# more than a frame period. Longer text is cut, and the cut is reported.
DEFAULT_MAX_TEXT_CHARS = 2000


def prepare_utterance(text: str, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> tuple:
    """Return ``(text, truncated)``: ``text`` cut to ``max_chars`` characters when longer.

    The text is otherwise passed through unchanged; empty or whitespace-only text stays empty and
    the encoder marks it invalid.
    """
    if max_chars < 1:
        raise ValueError(f'max_chars must be >= 1, got {max_chars}')
    text = '' if text is None else str(text)
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars], True
