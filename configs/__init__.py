"""Training configs: each get_config(arg) starts from genemamba_jax.train.config.default_config()."""
