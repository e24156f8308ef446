"""Social-media text normalisation, as TweetEval and the Cardiff NLP tweet models expect it."""

from __future__ import annotations

import re

_MENTION = re.compile(r"(?<![\w@])@\w+")
_LINK = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def normalize_post(text: str) -> str:
    """'@AmericanAir see  https://t.co/x 😡' -> '@user see http 😡'. Emojis are kept."""
    text = _MENTION.sub("@user", text)
    text = _LINK.sub("http", text)
    return _SPACE.sub(" ", text).strip()
