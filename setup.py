"""fedmpi: a federated-learning cluster simulator on MPI."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "fedmpi" / "__init__.py").read_text()).group(1)

MPI = ["mpi4py>=3.1", "mpich"]  # a self-contained MPI from PyPI; clusters build mpi4py against their own MPI
ANALYSIS = ["pandas>=1.5", "matplotlib>=3.5"]  # python -m fedmpi.analyze, fedmpi.results.load
TENSORBOARD = ["tensorboard>=2.10"]  # analyze --tensorboard: its event-file writer (brings grpcio, protobuf, werkzeug, markdown)

setup(
    name="fedmpi",
    version=VERSION,
    description="Federated-learning cluster simulator on MPI: robust aggregation, differential privacy, HDF5 results",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["fedmpi", "fedmpi.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.22",
        "torch>=2.1",
        "h5py>=3.5",
        "pyyaml>=6.0",
        "scikit-learn>=1.0",  # ships the UCI digits used by the default experiment
        "threadpoolctl>=3.0",  # one BLAS thread per block worker in the aggregation kernels
        "dp-accounting>=0.4",  # privacy accounting (RDP and PLD)
    ],
    extras_require={
        "mpi": MPI,
        "analysis": ANALYSIS,
        "tensorboard": ANALYSIS + TENSORBOARD,
        "test": MPI + ANALYSIS + TENSORBOARD + ["pytest>=7", "scipy"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Intended Audience :: Science/Research",
    ],
)
