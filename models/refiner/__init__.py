"""The score-based refiner (SGMSE+ / StoRM style): SDEs, samplers, NCSN++ and the refiner that
runs on a first stage's estimate (doc/design.md, "Score-based refiner")."""
