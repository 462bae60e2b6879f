"""Attributions and their reports: why a fine-tuned model answered as it did."""
