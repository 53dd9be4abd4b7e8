"""The RL baselines, run from the repo root as modules: python -m baselines.dpo, python -m baselines.ppo."""
