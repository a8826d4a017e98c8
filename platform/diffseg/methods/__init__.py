"""The two methods' building blocks: diffusion features and the pixel MLP ensemble (label-efficient); segmenting
and sampling with a factorized model."""
