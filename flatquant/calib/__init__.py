"""flatquant.calib."""
