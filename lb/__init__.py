"""lb: the built-in load balancer (consistent hashing with client affinity), sans-IO."""
