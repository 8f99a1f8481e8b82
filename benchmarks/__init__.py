"""resgeom_fast benchmarks (a package: shared helpers import as benchmarks.helpers)."""
