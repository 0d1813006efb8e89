"""Ray Serve applications of ft-ray."""
