"""Routing state during membership changes: who may still hold a moved bucket.

In steady state this map is empty: every key's owner is a pure function of the
view, and nobody else holds affinity to it. When a view changes, the previous
owner of each moved bucket may still hold sessions (or lingering affinity) for
keys in it. That node is authoritative for those keys: the new owner asks it,
and only it. The map records, per moved bucket, the nodes that may still hold
affinity there (usually exactly one: the previous owner; more when a bucket
moves again before it settled).

Entries go away when
- the holder reports, right after the view change, that it holds nothing
  there (HolderReport), or later that its last affinity there ended (Settle),
  or says so in an answer;
- the holder leaves the view (its sessions are lost with it);
- the holder becomes the bucket's owner again (owners decide locally).

Without history (a node that just started, or skipped an epoch) a node cannot
know which buckets moved. It then treats every other member as a possible
holder of every bucket ("unreported"), i.e. it broadcasts its questions, until
that member's HolderReport for the current epoch arrives.

Every node keeps the map for all buckets, not just its own, because a bucket
can move to it in the next view.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lb.view import ViewChange

_NOBODY: frozenset[str] = frozenset()


class HolderMap:
    """Possible holders of affinity per moved bucket, as seen by node `me`.

    Right after a view change the previous owner of each moved bucket is a
    possible holder. Those sets are large (about 1/N of the table per change)
    but short-lived: the owner's HolderReport replaces them a round trip later
    by the few buckets it really holds. So they are kept as the shared,
    read-only sets of the view change ("from history") and only the reported
    holdings are stored per bucket, indexed both ways.
    """

    def __init__(self, me: str) -> None:
        self.me = me
        self._by_bucket: dict[int, set[str]] = {}
        self._by_node: dict[str, set[int]] = {}
        self._from_history: dict[str, list[frozenset[int]]] = {}
        self._unreported: set[str] = set()

    def holders(self, bucket: int) -> frozenset[str] | set[str]:
        """The nodes to ask about a key in `bucket` (empty: decide locally)."""
        known = self._by_bucket.get(bucket, _NOBODY)
        if self._unreported:
            known = self._unreported | known
        if self._from_history:
            lost = {node for node, sets in self._from_history.items()
                    if any(bucket in buckets for buckets in sets)}
            if lost:
                known = lost | known
        return known

    def is_settled(self) -> bool:
        """True when no bucket is in transition (steady state)."""
        return not self._by_bucket and not self._unreported and not self._from_history

    def unsettled_bucket_count(self) -> int:
        """Buckets with reported holders (not counting unreported members)."""
        return len(self._by_bucket)

    def apply_change(self, change: ViewChange, owners: Sequence[str]) -> None:
        """Follow a view change seen with history; `owners` is the new table."""
        for node in change.removed:
            self._forget_node(node)
        for node, lost in change.moved_from.items():
            if node != self.me and node not in change.removed:
                self._from_history.setdefault(node, []).append(lost)
        for node, held in list(self._by_node.items()):
            for bucket in [b for b in held if owners[b] == node]:
                self._discard(bucket, node)  # owners decide locally

    def forget_history(self, others: Iterable[str]) -> None:
        """No history: every other member may hold anything until it reports."""
        self._by_bucket.clear()
        self._by_node.clear()
        self._from_history.clear()
        self._unreported = set(others)

    def apply_report(self, node: str, held: Iterable[int], owners: Sequence[str]) -> None:
        """`node` holds affinity exactly in `held` among buckets it does not own."""
        if node == self.me:
            return
        held_set = {bucket for bucket in held if owners[bucket] != node}
        self._unreported.discard(node)
        self._from_history.pop(node, None)
        for bucket in self._by_node.get(node, set()) - held_set:
            self._discard(bucket, node)
        for bucket in held_set:
            self._add(bucket, node)

    def apply_settle(self, node: str, buckets: Iterable[int]) -> None:
        """`node` no longer holds affinity in `buckets` (reported holdings only)."""
        for bucket in buckets:
            self._discard(bucket, node)

    def _forget_node(self, node: str) -> None:
        self._unreported.discard(node)
        self._from_history.pop(node, None)
        for bucket in list(self._by_node.get(node, ())):
            self._discard(bucket, node)

    def _add(self, bucket: int, node: str) -> None:
        self._by_bucket.setdefault(bucket, set()).add(node)
        self._by_node.setdefault(node, set()).add(bucket)

    def _discard(self, bucket: int, node: str) -> None:
        nodes = self._by_bucket.get(bucket)
        if nodes is None or node not in nodes:
            return
        nodes.discard(node)
        if not nodes:
            del self._by_bucket[bucket]
        buckets = self._by_node[node]
        buckets.discard(bucket)
        if not buckets:
            del self._by_node[node]
