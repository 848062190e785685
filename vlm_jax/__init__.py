"""vlm_jax: pure-functional JAX/Flax vision-language models on named device meshes."""

__version__ = "0.1.0"
