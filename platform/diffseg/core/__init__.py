"""The bottom layer: configs, the device/seed/`use_gpu` rules, storage locations, MLflow tracking, submitting jobs,
trusted state, images and report tables. Imports nothing else of diffseg."""
