"""fedmpi: a federated-learning cluster simulator on MPI.

Rank 0 aggregates, ranks >= 1 host virtual clients; see README.md and docs/.
Importing the package is cheap: it loads nothing heavy (no torch, no MPI).
:func:`simulate` runs an experiment in this process (for notebooks and scripts).
"""

__version__ = "0.1.0"


def simulate(config=None, *, overrides=(), out=None, overwrite=False, quiet=True):
    """Run one experiment in this process and return its results (a
    :class:`fedmpi.results.RunResults`, as :func:`fedmpi.results.load` reads them).
    ``config``: a YAML/JSON file, a mapping, a Config or None (the default
    experiment); ``overrides``: ``"KEY=VALUE"`` strings as ``--set``; ``out``: the
    results file. The same config under ``mpirun`` gives the same ``/model/final``
    bytes. Details: :func:`fedmpi.run.simulate`."""
    from .run import simulate as run_simulate  # torch, h5py... load here, not at import

    return run_simulate(config, overrides=overrides, out=out, overwrite=overwrite, quiet=quiet)
