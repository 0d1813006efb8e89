"""The files `ft-ray export hf` ships beside the weights, verbatim (they import only torch and
transformers, never ft_ray): configuration_ft_ray.py and modeling_ft_ray.py."""
