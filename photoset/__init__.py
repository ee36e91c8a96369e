"""The bundled demo model's photo set: built from Debian packages (build.py), grouped by source (by_source.py)."""
