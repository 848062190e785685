"""Vision and text encoders (ViT family, text transformers, two-tower dual encoders)."""
