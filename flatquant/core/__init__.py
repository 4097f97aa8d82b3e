"""flatquant.core."""
