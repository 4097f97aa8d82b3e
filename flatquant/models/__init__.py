"""flatquant.models."""
