"""Topic names, topic filters and subscription matching (MQTT sections 4.7 and 4.8).

Pure functions and an in-memory trie; no I/O, so broker and client share one implementation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import MQTTError
from .reasons import ReasonCode

__all__ = [
    "SHARE_PREFIX",
    "SubscriptionTree",
    "parse_shared",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]

SHARE_PREFIX = "$share/"
_MAX_UTF8_BYTES = 65535
# Longer topics are matched but not cached, so a client cannot pin megabytes in the cache.
_CACHE_MAX_TOPIC = 256

K = TypeVar("K")
V = TypeVar("V")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (section 4.7).

    ``+`` matches exactly one level, ``#`` matches the rest including the parent level
    (``a/#`` matches ``a``), and a topic starting with ``$`` is not matched by a filter
    whose first level is a wildcard (MQTT-4.7.2-1).  Inputs are assumed to be valid; this is
    the reference the trie is tested against and is fine for one-off checks.
    """
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    if topic[:1] == "$" and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    n_topic = len(t_levels)
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= n_topic:
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == n_topic


def _too_long(s: str) -> bool:
    """Whether ``s`` exceeds the 65535-byte limit of an MQTT UTF-8 string (section 1.5.4)."""
    # A code point is at most 4 bytes, so short strings skip the encode entirely.
    if len(s) * 4 <= _MAX_UTF8_BYTES:
        return False
    return len(s.encode("utf-8", "surrogatepass")) > _MAX_UTF8_BYTES


def validate_topic_name(name: str) -> None:
    """Reject a PUBLISH/Will topic name that the spec forbids.

    Empty (MQTT-4.7.3-1), a wildcard (3.1.1 MQTT-4.7.1-1, 5.0 MQTT-4.7.0-1), U+0000
    (MQTT-4.7.3-2) or more than 65535 UTF-8 bytes (MQTT-4.7.3-3).

    Raises ``MQTTError`` with ``TOPIC_NAME_INVALID`` so the caller can close or nack with it.
    """
    if not name:
        raise MQTTError("topic name is empty", ReasonCode.TOPIC_NAME_INVALID)
    if "+" in name or "#" in name:
        raise MQTTError(
            f"topic name contains a wildcard: {name!r}", ReasonCode.TOPIC_NAME_INVALID
        )  # 3.1.1 MQTT-4.7.1-1 / 5.0 MQTT-4.7.0-1
    if "\x00" in name:
        raise MQTTError("topic name contains U+0000", ReasonCode.TOPIC_NAME_INVALID)
    if _too_long(name):
        raise MQTTError("topic name longer than 65535 bytes", ReasonCode.TOPIC_NAME_INVALID)


def _check_filter(topic_filter: str) -> None:
    """Validate one plain (non-shared) filter: non-empty, no NUL, wildcards alone in a level."""
    if not topic_filter:
        raise MQTTError("topic filter is empty", ReasonCode.TOPIC_FILTER_INVALID)
    if "\x00" in topic_filter:
        raise MQTTError("topic filter contains U+0000", ReasonCode.TOPIC_FILTER_INVALID)
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            raise MQTTError(  # 3.1.1 MQTT-4.7.1-2 / 5.0 MQTT-4.7.1-1
                f"'#' must be alone in the last level: {topic_filter!r}",
                ReasonCode.TOPIC_FILTER_INVALID,
            )
        if "+" in level and level != "+":
            raise MQTTError(  # 3.1.1 MQTT-4.7.1-3 / 5.0 MQTT-4.7.1-2
                f"'+' must occupy a whole level: {topic_filter!r}",
                ReasonCode.TOPIC_FILTER_INVALID,
            )


def parse_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split ``$share/{ShareName}/{filter}`` into ``(ShareName, filter)`` (section 4.8.2).

    A non-shared filter comes back as ``(None, topic_filter)`` unchecked.  For a shared one the
    ShareName must be non-empty without ``/``, ``+`` or ``#`` (MQTT-4.8.2-1, MQTT-4.8.2-2) and
    the inner filter must be a valid non-empty filter; otherwise ``TOPIC_FILTER_INVALID``.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    group, sep, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not sep:
        raise MQTTError(
            f"shared subscription without a topic filter: {topic_filter!r}",
            ReasonCode.TOPIC_FILTER_INVALID,
        )
    if not group:
        raise MQTTError("empty ShareName", ReasonCode.TOPIC_FILTER_INVALID)  # MQTT-4.8.2-1
    if "+" in group or "#" in group or "\x00" in group:
        raise MQTTError(  # MQTT-4.8.2-2
            f"invalid ShareName: {group!r}", ReasonCode.TOPIC_FILTER_INVALID
        )
    _check_filter(inner)
    return group, inner


def validate_topic_filter(topic_filter: str) -> None:
    """Reject a SUBSCRIBE/UNSUBSCRIBE filter the spec forbids.

    Empty or with U+0000 or over 65535 bytes (MQTT-4.7.3-1/2/3), ``#`` not alone in the last
    level or ``+`` not alone in its level (3.1.1 MQTT-4.7.1-2/3; 5.0 MQTT-4.7.1-1/2).

    ``$share/`` filters are checked through ``parse_shared``.  Raises ``MQTTError`` with
    ``TOPIC_FILTER_INVALID``.
    """
    if _too_long(topic_filter):
        raise MQTTError("topic filter longer than 65535 bytes", ReasonCode.TOPIC_FILTER_INVALID)
    if topic_filter.startswith(SHARE_PREFIX):
        parse_shared(topic_filter)
    else:
        _check_filter(topic_filter)


class _Node(Generic[K, V]):
    """One topic level; ``subs`` holds the entries of the filter that ends here, if any."""

    __slots__ = ("children", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K, V]] = {}
        self.subs: dict[K, V] | None = None


class SubscriptionTree(Generic[K, V]):
    """Trie of topic filters keyed by level, so a PUBLISH costs O(levels), not O(filters).

    Each filter owns one ``dict[K, V]`` (e.g. client id -> subscription options) that ``match``
    hands out without copying.  Filters are stored verbatim: ``$share`` handling is the
    caller's job.  Nodes left empty by ``remove`` are pruned so churn does not leak memory.

    ``cache_size`` bounds a topic -> result cache (0 disables it).  Brokers see the same
    topics over and over, and a hit is ~10x cheaper than a walk; it is emptied whenever a
    filter appears or disappears, so under heavy subscribe churn it only adds a little cost.
    Adding or removing keys of an existing filter needs no invalidation: the cached lists
    hold the live per-filter dicts.
    """

    __slots__ = ("_by_filter", "_cache", "_cache_size", "_len", "_root")

    def __init__(self, cache_size: int = 1024) -> None:
        self._root: _Node[K, V] = _Node()
        # filter -> its entries dict (the same object as the trie node's ``subs``): gives O(1)
        # get/replace and a cheap ``filters()`` without walking the trie.
        self._by_filter: dict[str, dict[K, V]] = {}
        self._len = 0
        self._cache: dict[str, list[dict[K, V]]] = {}
        self._cache_size = cache_size

    def __len__(self) -> int:
        """Number of (filter, key) entries."""
        return self._len

    def __contains__(self, topic_filter: object) -> bool:
        return topic_filter in self._by_filter

    def filters(self) -> Iterator[str]:
        """Every filter with at least one entry."""
        return iter(list(self._by_filter))

    def get(self, topic_filter: str, key: K) -> V | None:
        """The value stored for ``key`` under ``topic_filter``, or None."""
        subs = self._by_filter.get(topic_filter)
        return None if subs is None else subs.get(key)

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Store ``value`` for ``key`` under ``topic_filter``; True if new, False if replaced."""
        subs = self._by_filter.get(topic_filter)
        if subs is None:
            node = self._root
            for level in topic_filter.split("/"):
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
                node = child
            subs = node.subs = {}
            self._by_filter[topic_filter] = subs
            self._cache.clear()
        new = key not in subs
        subs[key] = value
        if new:
            self._len += 1
        return new

    def remove(self, topic_filter: str, key: K) -> bool:
        """Drop ``key`` from ``topic_filter``; True if it was there.  Prunes emptied nodes."""
        subs = self._by_filter.get(topic_filter)
        if subs is None or key not in subs:
            return False
        del subs[key]
        self._len -= 1
        if subs:
            return True
        del self._by_filter[topic_filter]
        self._cache.clear()
        path: list[tuple[_Node[K, V], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            path.append((node, level))
            node = node.children[level]
        node.subs = None
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subs is not None or child.children:
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> list[dict[K, V]]:
        """The entry dicts of every filter matching ``topic``, each filter once.

        ``topic`` must be a valid topic name (no wildcards).  The dicts are the live ones:
        iterate them, do not mutate them or hold them across ``add``/``remove``.  The list
        itself is the caller's.
        """
        cached = self._cache.get(topic)
        if cached is not None:
            return cached.copy()
        result = self._walk(topic)
        if self._cache_size > 0 and len(topic) <= _CACHE_MAX_TOPIC:
            cache = self._cache
            if len(cache) >= self._cache_size:
                cache.clear()  # crude but O(1) amortised; hot topics come straight back
            cache[topic] = result
            return result.copy()
        return result

    def _walk(self, topic: str) -> list[dict[K, V]]:
        """Breadth-first walk of the trie, one topic level at a time, without recursion."""
        result: list[dict[K, V]] = []
        levels = topic.split("/")
        root = self._root.children
        if not root:
            return result
        # First level by hand: wildcards there never match a '$' topic (MQTT-4.7.2-1).
        first = levels[0]
        nodes: list[_Node[K, V]] = []
        child = root.get(first)
        if child is not None:
            nodes.append(child)
        if first[:1] != "$":
            child = root.get("#")
            if child is not None and child.subs:
                result.append(child.subs)
            child = root.get("+")
            if child is not None:
                nodes.append(child)
        for i in range(1, len(levels)):
            if not nodes:
                return result
            level = levels[i]
            nxt: list[_Node[K, V]] = []
            for node in nodes:
                children = node.children
                if not children:
                    continue
                child = children.get("#")
                if child is not None and child.subs:
                    result.append(child.subs)
                child = children.get(level)
                if child is not None:
                    nxt.append(child)
                child = children.get("+")
                if child is not None:
                    nxt.append(child)
            nodes = nxt
        for node in nodes:
            if node.subs:
                result.append(node.subs)
            children = node.children
            if children:
                # 'a/#' also matches 'a' itself (section 4.7.1.2).
                child = children.get("#")
                if child is not None and child.subs:
                    result.append(child.subs)
        return result
