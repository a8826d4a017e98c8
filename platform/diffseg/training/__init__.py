"""Training: the Ray-free loop (state, step, fit) and its Ray Train adapter."""
