"""resgeom_fast tests (a package: helpers import as tests.<dir>.<module>, never `conftest`)."""
