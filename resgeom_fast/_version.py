"""The version of resgeom_fast, written once: pyproject.toml reads it ([tool.setuptools.dynamic])
and resgeom_fast/__init__.py re-exports it."""
__version__ = "0.1.0"
