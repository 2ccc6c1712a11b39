"""Preference training on loratune's loop: losses, per-sequence log-probabilities and the objectives."""
