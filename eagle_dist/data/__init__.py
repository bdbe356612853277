"""Data: dataset layouts (`sources`), the shard builder (`shards`) and the WebDataset stream
(`stream`).  The command line is `python -m eagle_dist.shard` (see `eagle_dist.cli.shard`)."""
