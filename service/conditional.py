"""Conditional GETs of finished reports (RFC 9110 §13.1.2, §8.8.3): If-None-Match with a list of entity tags, weak
or strong, or "*"; and the caching headers of an immutable report."""

from __future__ import annotations

import re

# Private: reports belong to one tenant. Immutable: a finished report never changes; it applies while the response
# is fresh, hence the year of max-age.
IMMUTABLE_REPORT = "private, max-age=31536000, immutable"
_ENTITY_TAG = re.compile(r'\s*(?:W/)?("[^"]*")\s*(?:,|$)')


def none_match(header: str | None, etag: str) -> bool:
    """Whether If-None-Match `header` matches `etag` by the weak comparison GET uses: "*", or any tag in the list
    equal to it once W/ is dropped from both. A malformed list matches nothing (the full response is sent)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    position, tags = 0, []
    while position < len(header):
        found = _ENTITY_TAG.match(header, position)
        if found is None or found.end() == position:
            return False
        tags.append(found.group(1))
        position = found.end()
    return wanted in tags
