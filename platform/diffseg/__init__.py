"""diffseg: segmentation with diffusion models, from a laptop to a Ray cluster."""
