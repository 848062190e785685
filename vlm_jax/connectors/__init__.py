"""Connectors between a vision encoder and a language model (resamplers, projectors)."""
