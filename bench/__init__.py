"""Benchmarks of the product against baselines measured in the same run (`python -m bench`).

Not part of `make test`: it needs real Mosquitto, MariaDB and minutes of machine time.
See bench/README.md for what each figure means.
"""

__all__: list[str] = []
