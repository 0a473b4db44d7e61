"""Reading samples: finding and reading webdataset shards, the sample rules (validation, decoding), the
reasons a sample is rejected, and the seeded hash sample."""
