"""flatquant.ops."""
