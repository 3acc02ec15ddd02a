"""System builders: one module per system, registered in difflm.train.systems.SYSTEMS."""
