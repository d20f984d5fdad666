"""Synthetic data with known ground truth for demos, tests and the application training modes."""
