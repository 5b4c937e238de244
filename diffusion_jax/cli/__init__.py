"""The `diffusion-jax` command line: `main.py` (train, sample, edit, compare, sweep, ...), `pipelines.py`
(generate, convert); each command parses its flags and makes one call into the library."""
