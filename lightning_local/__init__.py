"""lightning_local."""
