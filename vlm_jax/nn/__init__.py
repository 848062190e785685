"""Building blocks shared by encoders, connectors and language models."""
