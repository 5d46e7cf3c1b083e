"""iterfuse_jax: IterFuse multi-task dense prediction (Wang & Luo, 2024) in JAX/Flax."""
