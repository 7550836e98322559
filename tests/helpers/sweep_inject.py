"""python -m fedmpi.sweep with faults injected into client training, keyed by the run's seed:

    python sweep_inject.py [--fail SEED:ROUND] [--fail-server SEED:ROUND] [--slow SEED:ROUND:SECONDS] -- SWEEP_ARGS...

``--fail``: the ranks that train clients (the workers; rank 0 when a run has one rank)
raise in that round of the run with that seed; ``--fail-server``: rank 0 raises after
collecting that round's updates; ``--slow``: the training ranks sleep before training
that round (the results do not change). Each may repeat.
"""

import sys
import time

from fedmpi import server, sweep, worker

argv = sys.argv[1:]
split = argv.index("--")
options, args = argv[:split], argv[split + 1:]
fail, fail_server, slow = set(), set(), {}
for flag, value in zip(options[::2], options[1::2]):
    parts = [float(p) if "." in p else int(p) for p in value.split(":")]
    if flag == "--fail":
        fail.add(tuple(parts))
    elif flag == "--fail-server":
        fail_server.add(tuple(parts))
    elif flag == "--slow":
        slow[tuple(parts[:2])] = parts[2]
    else:
        sys.exit(f"unknown option {flag}")

original = worker.ClientHost.train_slots


def train_slots(self, round_index, *a, **k):
    key = (self.cfg.seed, round_index)
    if key in slow:
        time.sleep(slow[key])
    if key in fail:
        raise RuntimeError(f"injected failure in round {round_index} of the run with seed {self.cfg.seed}")
    return original(self, round_index, *a, **k)


original_collect = server.ServerLoop.collect


def collect(self, round_index, *a, **k):
    updates = original_collect(self, round_index, *a, **k)
    if (self.cfg.seed, round_index) in fail_server:
        raise RuntimeError(f"injected server failure in round {round_index} of the run with seed {self.cfg.seed}")
    return updates


worker.ClientHost.train_slots = train_slots
server.ServerLoop.collect = collect
sys.exit(sweep.main(args))
