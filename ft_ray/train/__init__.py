"""ft-ray train."""
