"""If-None-Match as RFC 9110 §13.1.2 defines it for GET (weak comparison, lists, "*")."""

from __future__ import annotations

import pytest

from service.conditional import none_match

ETAG = '"abc123"'


@pytest.mark.parametrize(
    "header",
    [
        '"abc123"',
        'W/"abc123"',
        "*",
        ' "other", "abc123" ',
        '"other",W/"abc123"',
        '"a,b", "abc123"',  # a comma is a legal character inside an entity tag
    ],
)
def test_matching_headers(header):
    assert none_match(header, ETAG)
    assert none_match(header, f"W/{ETAG}")


@pytest.mark.parametrize("header", [None, "", '"other"', "abc123", '"abc123', '"abc1234"', '"x" "abc123"', '"a,b"'])
def test_headers_that_do_not_match(header):
    assert not none_match(header, ETAG)
