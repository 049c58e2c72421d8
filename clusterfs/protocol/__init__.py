"""The cluster file protocol: messages, the node side (ops, server), path checks."""
