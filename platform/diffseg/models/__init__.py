"""Networks and the diffusion process: schedules and samplers, the ADM U-Net, the factorized U-Net, the model builder
and its EMA, and the one checkpoint loader. Plain PyTorch: no Ray."""
