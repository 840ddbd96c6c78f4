"""Where a run is hosted: Flower's Simulation Engine in-process (`simulation`) or its Deployment Engine
on one machine with TLS and authenticated SuperNodes (`deploy`)."""
