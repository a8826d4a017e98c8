"""Data: paired-folder data sets, the synthetic scenes and the one resize policy; public layouts converted to paired
folders; the Parquet feature shards and their cache."""
