"""RL actor pools: rollout (generation) and ranking (reward scoring)."""
