"""Import of public checkpoints (Hugging Face safetensors directories) into vlm_jax param trees."""
