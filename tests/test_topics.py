"""Topic matching, validation, shared-subscription parsing and the subscription trie."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttproto.errors import MQTTError
from mqttproto.reasons import ReasonCode
from mqttproto.topics import (
    SubscriptionTree,
    parse_shared,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

# --- topic_matches: the spec's own examples -------------------------------------------------

SPEC_EXAMPLES = [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/player1/ranking", True),
    # 4.7.2 topics beginning with $ (MQTT-4.7.2-1)
    ("#", "$SYS/x", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    # plain filters and level edges
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a/#", "ab", False),
    ("/", "/", True),
    ("+/+", "/", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_EXAMPLES)
def test_topic_matches_spec_examples_4_7(topic_filter: str, topic: str, expected: bool) -> None:
    """Sections 4.7.1.2, 4.7.1.3 and 4.7.2 (MQTT-4.7.2-1)."""
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_EXAMPLES)
def test_tree_agrees_with_spec_examples(topic_filter: str, topic: str, expected: bool) -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    tree.add(topic_filter, "c", 1)
    assert tree.match(topic) == ([{"c": 1}] if expected else [])


# --- validate_topic_name -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "/", "a/b", "$SYS/x", "sport/tennis/", " ", "é/✓"])
def test_valid_topic_names(name: str) -> None:
    validate_topic_name(name)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="MQTT-4.7.3-1-empty"),
        pytest.param("a/+", id="MQTT-4.7.1-1-plus"),
        pytest.param("a/#", id="MQTT-4.7.1-1-hash"),
        pytest.param("a+b", id="MQTT-4.7.1-1-plus-inside-level"),
        pytest.param("a\x00b", id="MQTT-4.7.3-2-nul"),
        pytest.param("a" * 65536, id="MQTT-4.7.3-3-too-long"),
        pytest.param("é" * 32768, id="MQTT-4.7.3-3-too-long-multibyte"),
    ],
)
def test_invalid_topic_names(name: str) -> None:
    with pytest.raises(MQTTError) as exc:
        validate_topic_name(name)
    assert exc.value.reason_code == ReasonCode.TOPIC_NAME_INVALID


def test_topic_name_length_limit_counts_utf8_bytes_mqtt_4_7_3_3() -> None:
    validate_topic_name("a" * 65535)
    validate_topic_name("é" * 32767 + "a")  # 65535 bytes exactly


# --- validate_topic_filter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "+/+", "/+", "a/#", "a/+/b", "+/tennis/#", "$SYS/#", "/", "a//b", "$share/g/a/#"],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        pytest.param("", id="MQTT-4.7.3-1-empty"),
        pytest.param("a\x00", id="MQTT-4.7.3-2-nul"),
        pytest.param("a" * 65536, id="MQTT-4.7.3-3-too-long"),
        pytest.param("sport/tennis#", id="MQTT-4.7.1-2-hash-not-alone"),
        pytest.param("sport/tennis/#/ranking", id="MQTT-4.7.1-2-hash-not-last"),
        pytest.param("#/a", id="MQTT-4.7.1-2-hash-first-not-last"),
        pytest.param("##", id="MQTT-4.7.1-2-double-hash"),
        pytest.param("sport+", id="MQTT-4.7.1-3-plus-not-alone"),
        pytest.param("a/+b/c", id="MQTT-4.7.1-3-plus-prefix"),
        pytest.param("++", id="MQTT-4.7.1-3-double-plus"),
        pytest.param("$share/g/a#", id="shared-inner-invalid"),
        pytest.param("$share/g", id="shared-no-filter"),
    ],
)
def test_invalid_topic_filters(topic_filter: str) -> None:
    with pytest.raises(MQTTError) as exc:
        validate_topic_filter(topic_filter)
    assert exc.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID


# --- parse_shared (section 4.8.2) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("$share/g/a/b", ("g", "a/b")),
        ("$share/consumer1/sport/tennis/+", ("consumer1", "sport/tennis/+")),
        ("$share/g/#", ("g", "#")),
        ("$share/g//", ("g", "/")),
        ("$share/g/$SYS/#", ("g", "$SYS/#")),
        ("a/b", (None, "a/b")),
        ("$share", (None, "$share")),
        ("$SHARE/g/a", (None, "$SHARE/g/a")),
        ("$sys/x", (None, "$sys/x")),
    ],
)
def test_parse_shared(topic_filter: str, expected: tuple[str | None, str]) -> None:
    assert parse_shared(topic_filter) == expected


@pytest.mark.parametrize(
    "topic_filter",
    [
        pytest.param("$share//a", id="MQTT-4.8.2-1-empty-share-name"),
        pytest.param("$share/g+/a", id="MQTT-4.8.2-2-plus-in-share-name"),
        pytest.param("$share/+/a", id="MQTT-4.8.2-2-plus-share-name"),
        pytest.param("$share/#/a", id="MQTT-4.8.2-2-hash-share-name"),
        pytest.param("$share/g", id="no-filter"),
        pytest.param("$share/", id="nothing"),
        pytest.param("$share/g/", id="empty-filter"),
        pytest.param("$share/g/a/#/b", id="MQTT-4.7.1-2-inner"),
        pytest.param("$share/g/a+", id="MQTT-4.7.1-3-inner"),
        pytest.param("$share/g/a\x00", id="MQTT-4.7.3-2-inner"),
    ],
)
def test_parse_shared_invalid(topic_filter: str) -> None:
    with pytest.raises(MQTTError) as exc:
        parse_shared(topic_filter)
    assert exc.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID


# --- SubscriptionTree --------------------------------------------------------------------------


def _node_count(tree: SubscriptionTree[object, object]) -> int:
    stack = [tree._root]
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node.children.values())
    return count


def test_add_replace_get_len() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    assert len(tree) == 0
    assert tree.add("a/+", "c1", 1) is True
    assert tree.add("a/+", "c2", 2) is True
    assert tree.add("a/+", "c1", 3) is False  # replaced
    assert tree.add("a/#", "c1", 4) is True
    assert len(tree) == 3
    assert tree.get("a/+", "c1") == 3
    assert tree.get("a/+", "nope") is None
    assert tree.get("b", "c1") is None
    assert sorted(tree.filters()) == ["a/#", "a/+"]
    assert "a/+" in tree and "a" not in tree


def test_remove_semantics() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    tree.add("a/b", "c1", 1)
    tree.add("a/b", "c2", 2)
    assert tree.remove("a/b", "c3") is False
    assert tree.remove("x/y", "c1") is False
    assert tree.remove("a", "c1") is False  # a prefix node, not a filter
    assert tree.remove("a/b", "c1") is True
    assert tree.remove("a/b", "c1") is False
    assert tree.match("a/b") == [{"c2": 2}]
    assert tree.remove("a/b", "c2") is True
    assert tree.match("a/b") == []
    assert len(tree) == 0
    assert list(tree.filters()) == []


def test_match_returns_live_dicts_not_copies() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    tree.add("a/+", "c1", 1)
    (subs,) = tree.match("a/b")
    tree.add("a/+", "c2", 2)
    assert subs == {"c1": 1, "c2": 2}
    assert tree.match("a/b")[0] is subs


def test_pruning_keeps_tree_small_under_churn() -> None:
    tree: SubscriptionTree[int, int] = SubscriptionTree()
    tree.add("keep/me", 0, 0)
    baseline = _node_count(tree)
    for i in range(200):
        tree.add(f"dev/{i}/+/x/#", i, i)
        tree.add(f"dev/{i}/temp", i, i)
    for i in range(200):
        assert tree.remove(f"dev/{i}/+/x/#", i)
        assert tree.remove(f"dev/{i}/temp", i)
    assert _node_count(tree) == baseline
    assert list(tree.filters()) == ["keep/me"]


def test_pruning_stops_at_nodes_still_in_use() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    tree.add("a", "c", 1)
    tree.add("a/b/c", "c", 2)
    tree.add("a/b/d", "c", 3)
    tree.remove("a/b/c", "c")
    assert tree.match("a/b/d") == [{"c": 3}]
    tree.remove("a/b/d", "c")
    assert tree._root.children["a"].children == {}
    assert tree.match("a") == [{"c": 1}]
    tree.remove("a", "c")
    assert tree._root.children == {}


def test_parent_level_match_reported_once_section_4_7_1_2() -> None:
    """``a/#`` matches ``a`` via the parent-level rule and must still appear once."""
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    for f in ("a/#", "a", "+/#", "#", "+"):
        tree.add(f, f, 0)
    got = tree.match("a")
    assert sorted(k for d in got for k in d) == ["#", "+", "+/#", "a", "a/#"]


def test_dollar_topics_not_matched_by_leading_wildcards_mqtt_4_7_2_1() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    for f in ("#", "+/#", "+/monitor/Clients", "$SYS/#", "$SYS/+/Clients", "+/+/+"):
        tree.add(f, f, 0)
    got = sorted(k for d in tree.match("$SYS/monitor/Clients") for k in d)
    assert got == ["$SYS/#", "$SYS/+/Clients"]
    got = sorted(k for d in tree.match("SYS/monitor/Clients") for k in d)
    assert got == ["#", "+/#", "+/+/+", "+/monitor/Clients"]


def test_tree_stores_share_filters_verbatim() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    tree.add("$share/g/a", "c", 1)
    assert tree.match("a") == []
    assert tree.get("$share/g/a", "c") == 1


def test_empty_tree_and_empty_levels() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree()
    assert tree.match("a/b") == []
    tree.add("/", "c", 1)
    tree.add("//+", "d", 2)
    assert tree.match("/") == [{"c": 1}]
    assert tree.match("//x") == [{"d": 2}]
    assert tree.match("///") == []


def test_cache_invalidated_when_filters_appear_and_disappear() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree(cache_size=16)
    tree.add("a/+", "c1", 1)
    assert tree.match("a/b") == [{"c1": 1}]
    tree.add("a/b", "c2", 2)  # new filter: cached "a/b" must be dropped
    assert sorted(map(sorted, tree.match("a/b"))) == [["c1"], ["c2"]]
    tree.add("a/+", "c3", 3)  # new key on an existing filter: live dict, no invalidation needed
    assert {"c1": 1, "c3": 3} in tree.match("a/b")
    tree.remove("a/+", "c1")
    tree.remove("a/+", "c3")  # filter gone
    assert tree.match("a/b") == [{"c2": 2}]
    tree.add("a/+", "c1", 9)  # re-created with a fresh dict
    assert {"c1": 9} in tree.match("a/b")


def test_cache_is_bounded_and_results_are_callers_own() -> None:
    tree: SubscriptionTree[str, int] = SubscriptionTree(cache_size=4)
    tree.add("#", "c", 1)
    for i in range(50):
        tree.match(f"t/{i}")
    assert len(tree._cache) <= 4
    got = tree.match("t/x")
    got.clear()
    assert tree.match("t/x") == [{"c": 1}]
    long_topic = "x" * 10_000
    assert tree.match(long_topic) == [{"c": 1}]
    assert long_topic not in tree._cache
    assert SubscriptionTree(cache_size=0).match("a") == []


# --- property: the trie agrees with the reference matcher --------------------------------------

_LEVELS = ["a", "b", "$SYS", "", "x"]
_topic_levels = st.lists(st.sampled_from(_LEVELS), min_size=1, max_size=5)


@st.composite
def _filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*_LEVELS, "+"]), min_size=0, max_size=5))
    if not levels or draw(st.booleans()):
        levels.append("#")
    joined = "/".join(levels)
    return joined or "#"  # [""] would be the empty filter (MQTT-4.7.3-1)


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _filters(), st.integers(0, 2)),
        st.tuples(st.just("remove"), _filters(), st.integers(0, 2)),
        st.tuples(st.just("match"), _topic_levels.map("/".join).filter(bool), st.just(0)),
    ),
    max_size=60,
)


@pytest.mark.parametrize("cache_size", [0, 2, 1024])
@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_tree_match_agrees_with_topic_matches_mqtt_4_7_2_1(
    cache_size: int, ops: list[tuple[str, str, int]]
) -> None:
    """Random add/remove/match sequences over levels incl. ``+``, ``#``, ``$SYS`` and empty
    ones; matches are interleaved with changes so a stale cache entry would show."""
    tree: SubscriptionTree[int, str] = SubscriptionTree(cache_size=cache_size)
    live: dict[str, dict[int, str]] = {}
    for op, arg, key in ops:
        if op == "add":
            validate_topic_filter(arg)
            assert tree.add(arg, key, f"{arg}:{key}") == (key not in live.get(arg, {}))
            live.setdefault(arg, {})[key] = f"{arg}:{key}"
        elif op == "remove":
            assert tree.remove(arg, key) == (key in live.get(arg, {}))
            live.get(arg, {}).pop(key, None)
            if not live.get(arg, True):
                del live[arg]
        else:
            validate_topic_name(arg)
            got = tree.match(arg)
            expected = sorted((sorted(d.items()) for f, d in live.items() if topic_matches(f, arg)))
            assert sorted(sorted(d.items()) for d in got) == expected, arg
    assert len(tree) == sum(len(d) for d in live.values())
    assert sorted(tree.filters()) == sorted(live)
    assert all(tree.get(f, k) == v for f, d in live.items() for k, v in d.items())
