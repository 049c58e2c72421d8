"""Two-phase commit of namespace records across the cluster, sans-IO.

`view` (the membership view the core is given), `messages` (the wire protocol), `actions`
(what the cores ask a driver to do), `coordinator` (the leader's state machine),
`participant` (every member's state machine) and `member` (one node: both, with message
routing). The protocol is described in docs/commit-protocol.md.
"""
