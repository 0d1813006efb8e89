"""ft-ray data."""
