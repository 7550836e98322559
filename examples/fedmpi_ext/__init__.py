"""fedmpi_ext: the package of the docs/extending.md tutorial, outside fedmpi.

Everything here is named in a config by import path, e.g.
``aggregator: {name: "fedmpi_ext.rules:dnc"}``; fedmpi imports it on every rank.
Put the directory that holds this package on PYTHONPATH (``export
PYTHONPATH=$PWD/examples``) or install it (``pip install -e examples``).

- :func:`fedmpi_ext.rules.dnc`: Divide-and-Conquer (Shejwalkar and Houmansadr 2021);
- :data:`fedmpi_ext.attacks.byzmean`: ByzMean (Xu et al. 2022) over ALIE;
- :func:`fedmpi_ext.models.group_norm_cnn`: a small CNN with GroupNorm layers;
- :func:`fedmpi_ext.data.rotated_digits`: UCI digits, each client's rotated by its own angle.
"""

__version__ = "0.1.0"  # recorded in every results file that uses this package
