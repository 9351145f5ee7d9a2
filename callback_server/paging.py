"""The list shape and cursors, from :mod:`bridge.paging` (the REST proxy's lists use it too)."""

from bridge.paging import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MaybeNumber,
    MaybeText,
    Number,
    Text,
    decode_cursor,
    encode_cursor,
    page,
)

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "MaybeNumber", "MaybeText", "Number", "Text",
           "decode_cursor", "encode_cursor", "page"]
