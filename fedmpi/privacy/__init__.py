"""Differential privacy, by concern.

- :mod:`fedmpi.privacy.dpsgd`: sample-level DP-SGD (Abadi et al. 2016), per-example
  clipping without forming per-example gradients for the whole model;
- :mod:`fedmpi.privacy.client_level`: client-level DP-FedAvg (McMahan et al. 2018),
  update clipping and noise on the client (local) or the server (central);
- :mod:`fedmpi.privacy.accounting`: epsilon from Google's dp-accounting (RDP per
  round, PLD for the final report), noise calibration, the run's accountant and
  the DP-SGD schedule.
"""
