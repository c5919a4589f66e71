"""Loading a checkpoint of any supported family, its processor, and what trains.

The embedded base models themselves are built by `medift.embedded`."""
