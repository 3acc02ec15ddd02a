"""Systems: one module per system (build, evaluate, sample), all listed in `registry.SYSTEMS`."""
