"""Typer command-line apps: thin layers over the Python APIs of matgen, textgen and imagegen."""
