"""Language decoders."""
