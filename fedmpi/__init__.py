"""fedmpi: a federated-learning cluster simulator on MPI.

Rank 0 aggregates, ranks >= 1 host virtual clients; see README.md and docs/.
Importing the package is cheap: it loads nothing heavy (no torch, no MPI).
"""

__version__ = "0.1.0"
