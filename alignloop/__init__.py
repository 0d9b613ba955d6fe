"""alignloop: align language models with human feedback (SFT, reward models, PPO, and the loop)."""

__version__ = "0.1.0"
