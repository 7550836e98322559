"""Launch fedmpi.run with rank 0 stopping as on SIGTERM after round ROUND: python stop_after_round.py ROUND -- RUN_ARGS...

Sets the loop's stop signal exactly where the signal handler would, so the real
checkpoint-and-stop path runs at a known round, without racing a fast run.
"""

import sys

from fedmpi import comm, run, server

target_round = int(sys.argv[1])
args = sys.argv[sys.argv.index("--") + 1:]

if comm.launcher_rank() == 0:
    original = server.ServerLoop.run_round

    def run_round(self, r):
        original(self, r)
        if r == target_round:
            self.stop_signal = "SIGTERM"

    server.ServerLoop.run_round = run_round

sys.exit(run.main(args))
