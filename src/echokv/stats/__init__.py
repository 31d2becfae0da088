"""Calibration statistics: capture of post-RoPE Q/K/V, RoPE, second moments, and the one collector over them."""
