"""Everything that knows Hydra and W&B: the config schemas and checks, building parts from a config, one
run, sweeps and their summary, tracking, and how an entry point reports failures."""
