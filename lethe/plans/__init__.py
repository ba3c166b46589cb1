"""Plans: the pure erasure planner (policy decisions over the data map, routed by region)."""
