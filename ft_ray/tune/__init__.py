"""Ray Tune sweeps over latent bits, free bits and seeds."""
