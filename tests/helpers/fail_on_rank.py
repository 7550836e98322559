"""Launch fedmpi.run with one rank made to raise: python fail_on_rank.py RANK ROUND -- RUN_ARGS...

The failure is injected into that rank's client training (the worker role, or the
server role when RANK is 0), so the real abort path of a running job is exercised.
"""

import dataclasses
import sys
import time

from fedmpi import comm, run, worker

target_rank, target_round = int(sys.argv[1]), int(sys.argv[2])
args = sys.argv[sys.argv.index("--") + 1:]

if comm.launcher_rank() == target_rank:
    if target_rank == 0:
        from fedmpi import aggregation

        original_fedavg = aggregation.fedavg
        calls = []

        def failing_fedavg(*a, **k):
            calls.append(1)
            if len(calls) > target_round:
                print(f"injecting failure at {time.time():.3f}", file=sys.stderr, flush=True)
                raise RuntimeError("injected failure on the server")
            return original_fedavg(*a, **k)

        aggregation.RULES["fedavg"] = dataclasses.replace(aggregation.RULES["fedavg"], function=failing_fedavg)
    else:
        original = worker.ClientHost.train_slots

        def failing_train_slots(self, round_index, *a, **k):
            if round_index == target_round:
                print(f"injecting failure at {time.time():.3f}", file=sys.stderr, flush=True)
                raise RuntimeError(f"injected failure on worker rank {target_rank}")
            return original(self, round_index, *a, **k)

        worker.ClientHost.train_slots = failing_train_slots

sys.exit(run.main(args))
