"""The pure view rules: majority, leader choice, the next view, configuration."""

from __future__ import annotations

import pytest

from clusterfs.membership.config import MembershipConfig
from clusterfs.membership.view import (
    View,
    choose_leader,
    founding_view,
    majority_of,
    next_view,
    to_commit_view,
)
from clusterfs.txn.view import View as CommitView


@pytest.mark.parametrize(("count", "majority"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (16, 9)])
def test_majority_is_more_than_half(count: int, majority: int) -> None:
    assert majority_of(count) == majority


def test_view_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="sorted"):
        View(1, ("b", "a"), "a")
    with pytest.raises(ValueError, match="sorted"):
        View(1, ("a", "a"), "a")
    with pytest.raises(ValueError, match="leader"):
        View(1, ("a",), "b")
    with pytest.raises(ValueError, match="at least one"):
        View(1, (), "a")
    with pytest.raises(ValueError, match="epochs"):
        View(0, ("a",), "a")


def test_leader_is_kept_while_it_is_a_member() -> None:
    assert choose_leader(["c", "b", "d"], "d") == "d"


def test_leader_is_the_lowest_name_otherwise() -> None:
    assert choose_leader(["c", "b", "d"], "a") == "b"
    assert choose_leader(["c", "b"], None) == "b"
    with pytest.raises(ValueError):
        choose_leader([], "a")


def test_founding_view() -> None:
    assert founding_view("n1") == View(1, ("n1",), "n1")


def test_next_view_removes_and_adds_with_epoch_plus_one() -> None:
    current = View(4, ("a", "b", "c"), "b")
    assert next_view(current, remove=["c"], add=["e", "d"]) == View(5, ("a", "b", "d", "e"), "b")


def test_next_view_moves_leadership_when_the_leader_goes() -> None:
    current = View(4, ("a", "b", "c"), "b")
    assert next_view(current, remove=["b"]) == View(5, ("a", "c"), "a")


def test_next_view_is_none_without_change_or_without_members() -> None:
    current = View(4, ("a", "b"), "a")
    assert next_view(current) is None
    assert next_view(current, add=["a"]) is None
    assert next_view(current, remove=["a", "b"]) is None


def test_config_orders_its_timeouts() -> None:
    MembershipConfig()
    with pytest.raises(ValueError):
        MembershipConfig(heartbeat_interval_s=3.0, offline_timeout_s=2.5)
    with pytest.raises(ValueError):
        MembershipConfig(offline_timeout_s=4.0, suspect_timeout_s=3.0)
    with pytest.raises(ValueError):
        MembershipConfig(propose_timeout_s=0)


def test_views_convert_to_the_commit_layers_type() -> None:
    view = View(3, ("a", "b"), "b")
    assert to_commit_view(view) == CommitView(3, ("a", "b"), "b")
