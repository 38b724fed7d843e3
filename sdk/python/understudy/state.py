"""The function's own ordered key-value state, with JSON values.

Keys are ``str`` (stored as UTF-8) or ``bytes``; values are any JSON-able value. Every
read and write belongs to the current transaction. Host errors (``limit``: a key or
value too large, too many writes) raise ``Fail``.
"""

import json

from ._host import Fail, _fail_from_host, _wit

__all__ = [
    "delete", "get", "get_bytes", "key_after", "prefix_end", "put", "put_bytes",
    "scan", "scan_bytes", "scan_prefix",
]


def get(key):
    """The JSON value at ``key``, or ``None`` when there is none. A stored value that is
    not JSON raises ``Fail("bad-state")``."""
    raw = get_bytes(key)
    return None if raw is None else _decode(_key(key), raw)


def put(key, value):
    """Stores ``value`` as JSON at ``key``; ``Fail("bad-output")`` if it is not JSON-able."""
    try:
        raw = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise Fail("bad-output", f"value for key {_show(_key(key))} is not JSON: {e}") from None
    put_bytes(key, raw)


def delete(key):
    """Removes ``key``; removing a missing key is not an error."""
    try:
        _wit.state.delete(_key(key))
    except _wit.Err as e:
        raise _fail_from_host(e) from None


def scan(start, end=None, limit=1000):
    """``(key, value)`` pairs with ``start <= key < end`` in key order, at most ``limit``
    of them (the host may return fewer: only an empty page means the end). Keys come
    back as ``bytes``; ``end=None`` means no upper bound."""
    return [(key, _decode(key, raw)) for key, raw in scan_bytes(start, end, limit)]


def scan_prefix(prefix, limit=1000):
    """``scan`` over the keys that start with ``prefix``."""
    prefix = _key(prefix)
    return scan(prefix, prefix_end(prefix), limit)


def get_bytes(key):
    """The bytes at ``key``, or ``None``."""
    try:
        value = _wit.state.get(_key(key))
    except _wit.Err as e:
        raise _fail_from_host(e) from None
    return None if value is None else bytes(value)


def put_bytes(key, value):
    """Stores ``value`` (bytes) at ``key``."""
    try:
        _wit.state.put(_key(key), bytes(value))
    except _wit.Err as e:
        raise _fail_from_host(e) from None


def scan_bytes(start, end=None, limit=1000):
    """``scan`` with the values as bytes."""
    try:
        entries = _wit.state.scan(_key(start), None if end is None else _key(end), limit)
    except _wit.Err as e:
        raise _fail_from_host(e) from None
    return [(bytes(e.key), bytes(e.value)) for e in entries]


def prefix_end(prefix):
    """The first key after every key starting with ``prefix``, or ``None`` when there
    is none (an empty or all-0xff prefix)."""
    prefix = _key(prefix).rstrip(b"\xff")
    if not prefix:
        return None
    return prefix[:-1] + bytes([prefix[-1] + 1])


def key_after(key):
    """The first key after ``key``: where the next page of a scan starts."""
    return _key(key) + b"\0"


def _key(key):
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"a key is str or bytes, not {type(key).__name__}")


def _show(key):
    return repr(key.decode(errors="replace"))


def _decode(key, raw):
    try:
        return json.loads(raw)
    except ValueError as e:
        raise Fail("bad-state", f"value at key {_show(key)}: {e}") from None
