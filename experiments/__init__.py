"""The Hydra config tree. Config groups are the registry of components: one YAML file per option."""
